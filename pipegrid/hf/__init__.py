"""Hugging Face causal LMs as pipeline stages, and back (the ``hf`` extra: transformers, safetensors).

    from pipegrid import hf
    model = hf.from_pretrained("path/to/checkpoint", topology=pg.Topology(pipe=4, data=2))
    engine = pg.initialize(model, config)        # micro-batches: (input_ids, labels) or
    engine.train_batch(data_iter)                # ((input_ids, attention_mask), labels)
    hf.save_pretrained(engine, "out")            # AutoModelForCausalLM.from_pretrained("out") loads it

Every causal LM whose config declares ``base_model_pp_plan`` (Llama, Mistral, Qwen2/3,
Gemma, Phi-3, GPT-NeoX, ...) goes through one path driven by that plan; GPT-2 through
pipegrid's adapter plan. ``topology.tensor > 1`` splits every stage by the config's
``base_model_tp_plan`` (GPT-2: pipegrid's adapter TP plan). Only this package of pipegrid
imports transformers.
"""

from __future__ import annotations

try:
    import safetensors  # noqa: F401
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError(f"pipegrid.hf needs the hf extra (transformers>=5, safetensors): pip install -e \".[hf]\" "
                      f"({error})") from None

from pipegrid.hf.model import CausalLMLoss, HFCausalLM, VocabParallelCausalLMLoss, from_config, from_pretrained
from pipegrid.hf.pp_plan import ADAPTER_PLANS
from pipegrid.hf.save import save_pretrained
from pipegrid.hf.tp_plan import ADAPTER_TP_PLANS

__all__ = ["ADAPTER_PLANS", "ADAPTER_TP_PLANS", "CausalLMLoss", "HFCausalLM", "VocabParallelCausalLMLoss",
           "from_config", "from_pretrained", "save_pretrained"]
