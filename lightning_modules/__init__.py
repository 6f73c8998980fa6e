"""Training on top of Lightning: the LightningModule (lm.py: CausalLM, loss and validation
metrics over a batch's scored targets), the optimiser and schedule (optim.py, Lightning-free:
settings/schema.py imports it), context-parallel groups (parallel.py), and the callbacks
pipeline/build.py wires in: diverged steps not applied (nonfinite.py), throughput (throughput.py).
"""
