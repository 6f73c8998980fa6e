"""The LightningModule: CausalLM (loss, perplexity, optimizer, schedule, logging)."""
