"""Teacher signals: what each source expert does on a set of prompts, aligned to the target's tokenizer."""
