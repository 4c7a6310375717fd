"""What the tests share: models, the plain-torch references, the engine cases and the
DeepSpeed peers' scripts. Test modules import from here, never from one another."""
