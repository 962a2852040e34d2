"""One runner per kind of training (the table is hf_vram/tasks.py); each is set up, trains and saves through the
same interface (base.py). run.py trains a recipe: its dependencies first, then its runner."""
