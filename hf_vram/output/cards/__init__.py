"""The model cards (README.md) of every kind of output, with Hub metadata: lm.py (fine-tunes and models trained
from scratch), diffusion.py (pipelines), assembled.py (mixtures of experts), merged.py (an adapter merged into its
base). common.py holds what they share. Only what the recipe and the run's summary hold is shown: a value the
summary lacks is left out, never guessed. `hf-vram push` (hf_vram/hub.py) points the usage line at the repository
pushed to."""
