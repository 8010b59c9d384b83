"""The torch runtime: run .rmoe models inside transformers (needs torch and transformers).

    from resmoe_format.torch import load_model
    model = load_model("model.rmoe", mode="fused")        # or "materialize", "lazy"
    model.generate(input_ids, max_new_tokens=20)
"""
from .experts import ExpertCache, FusedExperts, LazyExperts
from .kinds import KINDS, ExpertKind, kind_for, register
from .load import MODES, load_model, patch_model

__all__ = ["load_model", "patch_model", "MODES", "LazyExperts", "FusedExperts", "ExpertCache", "ExpertKind",
           "KINDS", "kind_for", "register"]
