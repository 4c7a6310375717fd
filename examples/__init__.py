"""pipegrid's examples: end-to-end training scripts and the models they train."""
