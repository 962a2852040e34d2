"""`hf-vram ui`: the local web app (Gradio). Four views over one folder, ROOT (the current directory by default):
Recipe (pick, edit as YAML, validate, save), Plan (the stacked bar on a card as the settings change, the longest
context, --fit applied with one click), Runs (start `hf-vram train` as its own process, progress, loss curve, log,
stop and resume) and Outputs (the model card, a generate box, merge and push).

Every handler runs through hf_vram/ui/layout.py's `shown`: an error becomes a message in the page (a UserError as
the CLI words it, anything else as its type and message), never a traceback, and a running training is a separate
process that no error here can stop."""

from __future__ import annotations

import os
from pathlib import Path

from hf_vram.errors import UserError
from hf_vram.ui import recipes, runs


class App:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.outputs = self.root / "outputs"
        self.cache = self.root / ".hf-vram-ui"

    # Recipe view
    def choices(self) -> list[str]:
        return list(recipes.recipe_choices(self.root))

    def pick(self, label: str):
        """The recipe's text and name, and its values in the plan view's controls."""
        text, name = recipes.recipe_text(self.root, label), label.removesuffix(" (yours)")
        return text, name, *recipes.control_values(recipes.check_text(self.root, name, text)), f"Loaded `{label}`."

    def validate(self, name: str, text: str) -> str:
        loaded = recipes.check_text(self.root, name, text)
        return f"**Valid:** task {loaded.recipe.task}, output `outputs/{loaded.name}`."

    def save(self, name: str, text: str):
        import gradio as gr

        path = recipes.save_text(self.root, name, text)
        return f"Saved `{path}`.", gr.update(choices=self.choices(), value=f"{path.stem} (yours)")

    # Plan view
    def plan(self, name, text, gpu, micro_batch, max_length, checkpointing, offloading):
        overrides = recipes.control_overrides(micro_batch, max_length, checkpointing, offloading)
        loaded = recipes.check_text(self.root, name, text, overrides)
        picture = self.cache / f"plan-{loaded.name}-{gpu}-{'-'.join(o.split('=')[1] for o in overrides)}.png"
        text_out, path, longest, _ = recipes.plan_of(loaded, gpu, picture)
        import gradio as gr

        # The status line is left as it is: a plan finishing late must not wipe what another action said.
        return str(path), f"```\n{text_out}\n{longest}\n```", gr.update()

    def fit(self, name, text, gpu):
        from hf_vram.tasks import task_of
        from hf_vram.vram.gpus import get_gpu

        loaded = recipes.check_text(self.root, name, text)
        changes, fitted = task_of(loaded.recipe).make_planner().fit(loaded, get_gpu(gpu))
        if fitted is None or not fitted.fits:
            return "", "No micro-batch, checkpointing or optimizer setting fits this card."
        return " ".join(changes), (f"`--fit` suggests: `{' '.join(changes)}`" if changes else "It fits as it is.")

    def apply_fit(self, text: str, changes: str) -> tuple[str, str]:
        """The --fit changes written into the YAML text (as the CLI's key=value overrides would set them)."""
        import yaml

        from hf_vram.recipe.load import parse_override

        data = yaml.safe_load(text) or {}
        for change in changes.split():
            keys, value = parse_override(change)
            node = data
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = value
        return yaml.safe_dump(data, sort_keys=False), f"Applied `{changes}` to the recipe text." if changes else ""

    # Runs view
    def run_rows(self) -> list[list]:
        return [r.row() for r in runs.list_runs(self.outputs)]

    def start(self, name: str, text: str):
        import gradio as gr

        loaded = recipes.check_text(self.root, name, text)
        path = recipes.save_text(self.root, loaded.name, text)
        out = self.outputs / loaded.name
        pid = runs.start_run(path, out, self.root)
        choices = [r[0] for r in self.run_rows()]
        return f"Started `{loaded.name}` (process {pid}) into `{out}`.", gr.update(choices=choices, value=loaded.name)

    def watch(self, run_name: str):
        rows = self.run_rows()
        if not run_name:
            return rows, None, "", ""
        out = self.outputs / run_name
        picture = runs.loss_picture(out, self.cache)
        info = next((r for r in runs.list_runs(self.outputs) if r.name == run_name), None)
        state = f"**{run_name}**: {info.status}" + (f", step {info.step}/{info.max_steps}" if info and info.step else "")
        if info and info.status == "running" and info.eta_seconds is not None:
            state += f", about {info.eta_seconds:.0f} s left"
        if memory := runs.memory_line(out):
            state += f"; {memory}"
        return rows, str(picture) if picture else None, runs.log_tail(out), state

    def stop(self, run_name: str) -> str:
        runs.stop_run(self.outputs / run_name)
        return f"Stop requested for `{run_name}`: it saves a checkpoint after its current step."

    def resume(self, run_name: str) -> str:
        pid = runs.resume_run(self.outputs / run_name)
        return f"Resumed `{run_name}` (process {pid}) from its last checkpoint."

    # Outputs view
    def finished(self) -> list[str]:
        return [r.name for r in runs.list_runs(self.outputs) if r.status == "finished"]

    def card(self, run_name: str) -> str:
        path = self.outputs / run_name / "README.md"
        if not path.is_file():
            raise UserError(f"{run_name} has no model card (README.md) yet: it is written when the run finishes")
        text = path.read_text()
        body = text.split("---", 2)[2] if text.startswith("---") else text  # the card's YAML header left out
        return body, runs.sample_grids(self.outputs / run_name), f"Model card of `{run_name}`."

    def generate(self, run_name: str, prompt: str) -> str:
        from hf_vram.generate import pipeline_generate

        out = self.outputs / run_name
        if (out / "model_index.json").is_file():
            raise UserError("a diffusion output: its samples are in the card's folder (samples/, `hf-vram generate`)")
        return pipeline_generate(out, [prompt], max_new_tokens=32)[0], f"Generated by `{run_name}`."

    def merge(self, run_name: str) -> str:
        from hf_vram.merge import merge_adapter

        return f"Merged into `{merge_adapter(self.outputs / run_name)}`."

    def push(self, run_name: str, repo_id: str) -> str:
        from hf_vram.hub import push_output

        # The token is read by huggingface_hub from HF_TOKEN or the login cache; the page never sees it.
        return f"Pushed: {push_output(self.outputs / run_name, repo_id or None)}"


def build_app(root: Path):
    """The gr.Blocks app over ROOT."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from hf_vram.ui.layout import lay_out

    app = App(root)
    with gr.Blocks(title="hf-vram") as blocks:
        lay_out(app, gr, blocks)
    return blocks


def theme():
    """Gradio's default look with the system's fonts: its own fetch Google's, which an offline machine lacks."""
    import gradio as gr

    return gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace"))


def serve(root: Path, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None) -> None:
    users = None
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth: give it as user:password")
        users = [(user, password)]
    if host not in ("127.0.0.1", "localhost", "::1") and users is None:
        raise UserError(f"--host {host}: the UI starts training runs; on an address other machines reach, give "
                        "--auth user:password")
    print(f"hf-vram ui on http://{host}:{port} (folder {Path(root).resolve()}); Ctrl-C ends it, runs go on", flush=True)
    build_app(root).launch(server_name=host, server_port=port, auth=users, show_error=False, quiet=True, theme=theme())
