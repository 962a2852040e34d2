"""Text generated from a few prompts at every held-out evaluation: a model trained from scratch shows what it has
learned so far (nanoGPT's sample.py, during training). Printed, logged, and appended to OUTPUT_DIR/samples.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_vram.generate import room_for


class SampleText(TrainerCallback):
    def __init__(self, tokenizer, prompts: list[str], max_new_tokens: int, output_dir: Path):
        self.tokenizer, self.prompts, self.max_new_tokens = tokenizer, prompts, max_new_tokens
        self.path = Path(output_dir) / "samples.jsonl"
        self.last_step = None

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None or state.global_step == self.last_step:
            return  # the runner's final evaluation can fall on the step the schedule just evaluated
        self.last_step = state.global_step
        was_training = model.training
        model.eval()
        rows = []
        # Sampled, not greedy: nanoGPT's temperature 0.8 and top-k 200; seeded so that samples compare across steps.
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(args.seed)
        try:
            with torch.no_grad():
                for prompt in self.prompts:
                    ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
                    new = room_for(model.config, ids.shape[1], self.max_new_tokens)
                    out = model.generate(ids, max_new_tokens=new, do_sample=True, temperature=0.8, top_k=200,
                                         pad_token_id=self.tokenizer.pad_token_id)
                    text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                    rows.append({"step": state.global_step, "prompt": prompt, "text": text})
                    print(f"[hf-vram] sample at step {state.global_step}: {prompt!r} -> {text!r}", flush=True)
        finally:
            torch.random.set_rng_state(generator_state)  # training's own randomness (dropout) is left as it was
            model.train(was_training)
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
