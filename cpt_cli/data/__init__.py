"""Where data comes from and how it becomes batches: source -> tokenize (cache) -> plan (mixture)
-> pack -> load. prepare.py runs them for a recipe: prepare_data the sources, the tokenizer and the
held-out sets, plan_data the packed streams and the mixture plan (docs/architecture.md)."""
