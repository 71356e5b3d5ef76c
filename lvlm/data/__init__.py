"""Data: sources -> Sample -> tokens -> batches. Knows nothing of models: it is handed a tokenizer,
an image transform and the number of LLM tokens per image."""
