"""`hf-vram ui`: a local web app (Gradio) over a folder of recipes and outputs: hf_vram/ui/app.py (what each view
does), layout.py (its components and events), recipes.py and runs.py (the work, with no Gradio in it)."""
