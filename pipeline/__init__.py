"""What runs an experiment: a config becomes a trained run (training.py, build.py), a run's
checkpoints become measurements (evaluation.py, scoring.py, eval_files.py), and what runs leave
on disk is read back (outputs.py) and shown (display.py, progress.py)."""
