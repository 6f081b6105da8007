"""Pretraining and fine-tuning: the train step, its objectives, metrics, FLOP accounting."""
