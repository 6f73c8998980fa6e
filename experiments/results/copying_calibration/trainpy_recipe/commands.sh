set -e
cd /work/main
.venv/bin/python train.py configs/recipe/copying.yaml configs/recipe/copying_stage.yaml model.d_model=128 model.n_layer=2 model.n_head=4 model.d_ff=512 model.norm=pre model.position=rope model.attention=dense data.num_workers=1 trainer.val_check_interval=200 trainer.limit_val_batches=8 checkpoint.every_n_steps=1000 run_dir=runs/recipe.stage
.venv/bin/python train.py configs/recipe/copying.yaml model.d_model=128 model.n_layer=2 model.n_head=4 model.d_ff=512 model.norm=pre model.position=rope model.attention=dense data.num_workers=1 trainer.val_check_interval=200 trainer.limit_val_batches=8 checkpoint.every_n_steps=1000 data.seq_len=512 data.batch_size=16 trainer.max_steps=300 init_from=runs/recipe.stage/checkpoints/last.ckpt run_dir=runs/recipe_dense
.venv/bin/python eval.py checkpoints=[runs/recipe_dense/checkpoints/last.ckpt] split=val span_windows=16 context_lengths=[64,128,256,512] max_tokens_per_document=2048 out_dir=runs/recipe_dense/eval
