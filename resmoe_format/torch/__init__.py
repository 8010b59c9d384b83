"""The torch runtime: run .rmoe models inside transformers (needs torch and transformers).

    from resmoe_format.torch import load_model, load_tokenizer
    model = load_model("model.rmoe", mode="fused")        # or "materialize", "lazy"
    tokenizer = load_tokenizer("model.rmoe")              # the embedded tokenizer files
    input_ids = tokenizer("def main():", return_tensors="pt").input_ids
    model.generate(input_ids, max_new_tokens=20)
"""
from .experts import ExpertCache, FusedExperts, LazyExperts
from .kinds import KINDS, ExpertKind, kind_for, register
from .load import MODES, cache_stats, load_model, patch_model
from .text import GenerationStats, generate_text, load_tokenizer

__all__ = ["load_model", "patch_model", "cache_stats", "load_tokenizer", "generate_text", "GenerationStats", "MODES",
           "LazyExperts", "FusedExperts", "ExpertCache", "ExpertKind", "KINDS", "kind_for", "register"]
