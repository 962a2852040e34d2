"""The components of `hf-vram ui` and what each event calls (hf_vram/ui/app.py's App). Every component a test
drives has an elem_id."""

from __future__ import annotations

import functools

from hf_vram.errors import UserError
from hf_vram.vram.gpus import DEFAULT_GPU, GPUS

REFRESH_SECONDS = 2.0


def shown(fn, n_out: int, status_at: int = -1):
    """fn with its exceptions shown: on failure every output is left as it is (gr.update()) except the status
    output, at status_at, which gets the message."""
    import gradio as gr

    @functools.wraps(fn)
    def run(*args):
        try:
            return fn(*args)
        except UserError as e:
            message = f"**Error:** {e}"
        except Exception as e:  # shown, not raised: the page (and any training) stays up
            message = f"**Error:** {type(e).__name__}: {e}"
        out = [gr.update() for _ in range(n_out)]
        out[status_at] = message
        return tuple(out) if n_out > 1 else out[0]

    return run

RUN_HEADERS = ["run", "status", "steps", "left", "output"]


def lay_out(app, gr, blocks) -> None:
    gr.Markdown("# hf-vram\nPick a recipe, see its memory plan on your card, train it, watch it learn.")
    status = gr.Markdown(elem_id="status")
    with gr.Row():
        choice = gr.Dropdown(app.choices(), label="recipe", value=None, elem_id="recipe-choice", scale=3)
        name = gr.Textbox(label="name (saved as ROOT/recipes/NAME.yaml)", elem_id="recipe-name", scale=2)
    with gr.Tab("Recipe"):
        text = gr.Code(language="yaml", label="recipe (YAML)", elem_id="recipe-text", lines=18)
        with gr.Row():
            validate = gr.Button("Validate", elem_id="validate")
            save = gr.Button("Save as new recipe", elem_id="save")
    plan_parts = _plan_tab(app, gr, name, text, status)
    chosen = _runs_tab(app, gr, name, text, status)
    finished = _outputs_tab(app, gr, status)
    # Read again at every page load: a run started before a reload (or by a UI before this one) is listed.
    blocks.load(lambda: (gr.update(choices=app.choices()), gr.update(choices=[r[0] for r in app.run_rows()]),
                         gr.update(choices=app.finished())), [], [choice, chosen, finished])
    controls, picture, details = plan_parts[:5], plan_parts[5], plan_parts[6]
    choice.change(shown(app.pick, 7), [choice], [text, name, *controls[1:], status]).then(
        shown(app.plan, 3), [name, text, *controls], [picture, details, status])
    validate.click(shown(app.validate, 1), [name, text], [status])
    save.click(shown(app.save, 2, status_at=0), [name, text], [status, choice])


def _plan_tab(app, gr, name, text, status) -> list:
    with gr.Tab("Plan"):
        with gr.Row():
            gpu = gr.Dropdown(list(GPUS), value=DEFAULT_GPU, label="card", elem_id="plan-gpu")
            micro = gr.Number(label="micro-batch (Enter to plan)", precision=0, elem_id="plan-micro-batch")
            length = gr.Number(label="sequence length (Enter to plan)", precision=0, elem_id="plan-max-length")
            ckpt = gr.Checkbox(label="gradient checkpointing", elem_id="plan-checkpointing")
            offload = gr.Radio(["auto", "on", "off"], label="activation offloading", elem_id="plan-offloading")
        with gr.Row():
            picture = gr.Image(label="plan", type="filepath", elem_id="plan-picture", height=420, scale=2)
            details = gr.Markdown(elem_id="plan-text")
        with gr.Row():
            fit = gr.Button("Fit to this card", elem_id="fit")
            changes = gr.Textbox(label="--fit changes", elem_id="fit-changes", interactive=False)
            apply = gr.Button("Apply the changes", elem_id="apply-fit")
    controls = [gpu, micro, length, ckpt, offload]
    outputs = [picture, details, status]
    # User events only: a recipe picked sets the controls to its values without planning four times.
    for event in (gpu.input, micro.submit, length.submit, ckpt.input, offload.input):
        event(shown(app.plan, 3), [name, text, *controls], outputs)
    fit.click(shown(app.fit, 2), [name, text, gpu], [changes, status])
    apply.click(shown(app.apply_fit, 2), [text, changes], [text, status]).then(
        shown(app.plan, 3), [name, text, *controls], outputs)
    return [*controls, picture, details]


def _runs_tab(app, gr, name, text, status):
    with gr.Tab("Runs"):
        with gr.Row():
            start = gr.Button("Start training this recipe", variant="primary", elem_id="start")
            chosen = gr.Dropdown([r[0] for r in app.run_rows()], label="run", allow_custom_value=True,
                                 elem_id="run-choice")
            stop = gr.Button("Stop (checkpoint kept)", elem_id="stop")
            resume = gr.Button("Resume", elem_id="resume")
        state = gr.Markdown(elem_id="run-state")
        with gr.Row():
            loss = gr.Image(label="loss", type="filepath", elem_id="run-loss", height=360)
            log = gr.Textbox(label="log (last lines)", lines=16, max_lines=16, elem_id="run-log")
        table = gr.Dataframe(headers=RUN_HEADERS, value=app.run_rows(), interactive=False, elem_id="runs")
    start.click(shown(app.start, 2, status_at=0), [name, text], [status, chosen])
    stop.click(shown(app.stop, 1), [chosen], [status])
    resume.click(shown(app.resume, 1), [chosen], [status])
    watch = shown(app.watch, 4, status_at=3)
    gr.Timer(REFRESH_SECONDS).tick(watch, [chosen], [table, loss, log, state])
    chosen.change(watch, [chosen], [table, loss, log, state])
    return chosen


def _outputs_tab(app, gr, status):
    with gr.Tab("Outputs"):
        with gr.Row():
            finished = gr.Dropdown(app.finished(), label="finished run", allow_custom_value=True, elem_id="output-choice")
            refresh = gr.Button("Refresh", elem_id="output-refresh")
        card = gr.Markdown(elem_id="output-card")
        grids = gr.Gallery(label="sample grids (diffusion runs)", elem_id="output-samples", columns=4, height="auto")
        with gr.Row():
            prompt = gr.Textbox(label="prompt", elem_id="generate-prompt", scale=3)
            generate = gr.Button("Generate", elem_id="generate")
        answer = gr.Textbox(label="generated", elem_id="generate-answer", interactive=False)
        with gr.Row():
            merge = gr.Button("Merge adapter into the base", elem_id="merge")
            repo = gr.Textbox(label="Hub repository (owner/name)", elem_id="push-repo")
            push = gr.Button("Push to the Hub", elem_id="push")
    refresh.click(lambda: gr.update(choices=app.finished()), [], [finished])
    finished.change(shown(app.card, 3), [finished], [card, grids, status])
    generate.click(shown(app.generate, 2, status_at=1), [finished, prompt], [answer, status])
    merge.click(shown(app.merge, 1), [finished], [status])
    push.click(shown(app.push, 1), [finished, repo], [status])
    return finished
