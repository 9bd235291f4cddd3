"""Where data comes from and how it becomes batches: source -> tokenize (cache) -> plan (mixture)
-> pack -> load. prepare.py runs the first three for a recipe."""
