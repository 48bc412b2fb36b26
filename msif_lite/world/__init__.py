"""The kit's own world (notebook 05): the fictional corpus and questions, the tokenizer and
model presets, pre-training and proximity fine-tuning, and the shipped checkpoints."""
