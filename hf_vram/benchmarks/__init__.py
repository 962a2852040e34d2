"""EleutherAI's lm-evaluation-harness on hf-vram outputs: `hf-vram eval OUTPUT_DIR --tasks ...` and a recipe's
eval.tasks. tasks.py says which tasks a list of names means and loads them (hf-vram's own from
hf_vram/eval_tasks/, offline; lm-eval's from the Hub); output_model.py loads an output as hf-vram scores it;
harness.py runs lm-eval's simple_evaluate on a model in memory and reads the scores back."""
