"""What a user sees in the Prefect and MLflow UIs, checked in a real browser (Debian's chromium, headless).

    python benchmarks/ui_screenshots.py [--out docs] [--keep]

Starts `prefect server` and `mlflow server` on free loopback ports, serves the quantize deployment on a small
params.yaml (16 calibration, 8 validation images, no search), then in chromium:

1. opens the deployment's custom-run form and checks that each field shows params.yaml's value (a number field, an
   enum as a dropdown, each key's description), changes one field (max_map_drop) and submits the run;
2. waits for the run and checks in MLflow that only that key changed (every other one as in params.yaml);
3. opens the `yoloq` experiment in the MLflow UI and checks that it opens on the runs table (not on the GenAI traces
   overview) with the Dataset and Source columns filled.

Screenshots: OUT/prefect-custom-run.png and OUT/mlflow-runs.png. Needs chromium (`apt-get install chromium`) and the
playwright package (dev extra; it drives /usr/bin/chromium, no browser download). About 2-3 minutes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))  # this checkout's flows and yoloq, when run as a script

from benchmarks.loopback import Processes, free_port, http_ok, server_env, small_run_params, wait_until  # noqa: E402

BIN = Path(sys.executable).parent
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
DEPLOYMENT_NAME = "ui-check"
CHANGED_FIELD, CHANGED_VALUE = "max_map_drop", 0.05


def chromium_path() -> str | None:
    """The system chromium (Debian's package), or None when it is not installed."""
    return next((p for p in CHROMIUM_CANDIDATES if Path(p).is_file()), None) or shutil.which("chromium")


@dataclass
class Stack:
    """The servers of one check: Prefect (UI + API), MLflow (UI + tracking), the served deployment."""

    root: Path
    prefect_url: str
    mlflow_url: str
    params_path: Path
    deployment_id: str
    env: dict[str, str]


@contextmanager
def servers(root: Path) -> Iterator[Stack]:
    """Prefect and MLflow servers on free loopback ports and the served deployment; all stopped on exit."""
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    env = server_env(root, f"{prefect_url}/api", mlflow_url, PROJECT, BIN)
    params_path = write_params(root, mlflow_url)
    processes = Processes(env, root, PROJECT)
    start = processes.start
    try:
        prefect = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
        prefect_log = start("prefect-server", prefect)
        store = [
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "mlartifacts"),
        ]
        mlflow = [
            str(BIN / "mlflow"),
            "server",
            *store,
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
        ]
        mlflow_log = start("mlflow-server", mlflow)
        wait_until(lambda: http_ok(f"{prefect_url}/api/health"), 120, "prefect server", (prefect_log,))
        wait_until(lambda: http_ok(f"{mlflow_url}/health"), 120, "mlflow server", (mlflow_log,))
        serve = [sys.executable, "-m", "flows.deploy", "serve", "-p", str(params_path), "--name", DEPLOYMENT_NAME]
        serve_log = start("serve", [*serve, "--no-trigger"])
        deployment = wait_until(
            lambda: api(prefect_url, f"deployments/name/yoloq-quantize-deployment/{DEPLOYMENT_NAME}"),
            120,
            "served deployment",
            (serve_log,),
        )
        yield Stack(root, prefect_url, mlflow_url, params_path, deployment["id"], env)
    finally:
        processes.stop_all()


def api(prefect_url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call to the Prefect REST API (GET, or POST with `body`)."""
    import json

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{prefect_url}/api/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def write_params(root: Path, tracking_uri: str) -> Path:
    """params.yaml with small data (16 calibration, 8 validation images, no search), logging to `tracking_uri`."""
    data = small_run_params(tracking_uri, root / "runs")
    select = PROJECT / "data/coco/select"
    data["selection"].update(images=str(select / "images"), labels=str(select / "labels"))
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextmanager
def browser_page(profile: Path) -> Iterator[Any]:
    """A page of the system chromium, headless, with a fresh profile and no network beyond loopback use."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("chromium is not installed: apt-get install -y chromium")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=executable,
            headless=True,
            args=list(CHROMIUM_FLAGS[1:]),  # playwright passes its own --headless
            viewport={"width": 1600, "height": 900},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            context.close()


def check_prefect_form(page: Any, stack: Stack, out: Path) -> dict[str, Any]:
    """The custom-run form of the served deployment (Prefect's default UI): params.yaml's values, dropdowns,
    descriptions; then one field changed and the run submitted. Returns what was seen."""
    from yoloq.config import load_params

    params = load_params(stack.params_path)
    page.goto(f"{stack.prefect_url}/v2/deployments/deployment/{stack.deployment_id}/run", wait_until="networkidle")
    page.get_by_text("Parameters", exact=True).wait_for()
    field = lambda name: page.get_by_label(f"{name} (Optional)", exact=True)  # noqa: E731
    seen = {
        "calibration_images": field("calibration_images").input_value(),
        "validation_images": field("validation_images").input_value(),
        "max_map_drop": field("max_map_drop").input_value(),
        "model_path": field("model_path").input_value(),
    }
    expected = {
        "calibration_images": str(params.calibration.num_images),
        "validation_images": str(params.validation.num_images),
        "max_map_drop": str(params.gate.max_map_drop),
        "model_path": str(params.model.path),
    }
    assert seen == expected, f"the form shows {seen}, params.yaml says {expected}"
    assert page.get_by_text('Property is type "None"').count() == 0, "a field is still a None toggle"
    dropdown = page.get_by_role("button", name="Select backend")
    assert dropdown.get_attribute("aria-haspopup") == "listbox", "backend is not a dropdown"
    assert dropdown.inner_text().strip() == params.backend
    dropdown.click()
    options = [o.strip() for o in page.get_by_role("option").all_inner_texts()]
    assert options == ["auto", "onnxruntime", "tensorrt"], f"backend dropdown offers {options}"
    page.keyboard.press("Escape")
    description = "gate.max_map_drop: largest mAP50-95 drop vs fp32"
    assert page.get_by_text(description).count() == 1, "max_map_drop has no description"
    field(CHANGED_FIELD).fill(str(CHANGED_VALUE))
    parameters = page.get_by_text("Parameters", exact=True).locator("xpath=..")
    parameters.screenshot(path=str(out / "prefect-custom-run.png"))
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(lambda url: not url.rstrip("/").endswith("/run"))  # back on the deployment: submitted
    return {"fields": seen, "backend_options": options}


def dismiss_tip(page: Any) -> None:
    """Close the "Detect Issues" tip the MLflow GenAI overview shows on a browser's first visit (it blocks clicks)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.get_by_role("button", name="Got it").click(timeout=10_000)
    except PlaywrightTimeout:
        pass  # no tip this time


def wait_for_flow_run(stack: Stack, timeout_s: float = 600) -> dict[str, Any]:
    """The deployment's flow run (the one the form submitted), once it is in a final state."""

    def final() -> dict[str, Any] | None:
        runs = api(stack.prefect_url, "flow_runs/filter", {"deployments": {"id": {"any_": [stack.deployment_id]}}})
        done = [r for r in runs if r["state"] and r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")]
        return done[0] if done else None

    return wait_until(final, timeout_s, "the submitted flow run", (stack.root / "serve.log",))


def check_mlflow_runs(page: Any, stack: Stack, out: Path) -> dict[str, Any]:
    """The `yoloq` experiment in the MLflow UI: tagged as model training; the link yoloq prints opens the runs table
    with the Dataset and Source columns filled; once the user has picked "Model training", so does the plain
    experiment URL. Returns what was seen, including where a fresh browser lands on the plain URL."""
    from mlflow.tracking import MlflowClient

    from flows.tracking import DIGEST_LENGTH, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, runs_page

    experiment = MlflowClient(stack.mlflow_url).get_experiment_by_name("yoloq")
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING_KIND, experiment.tags
    plain = f"{stack.mlflow_url}/#/experiments/{experiment.experiment_id}"
    page.goto(plain, wait_until="load")
    page.wait_for_url(lambda url: "/overview" in url or "/runs" in url)
    fresh_landing = page.url  # MLflow 3.17: the browser's GenAI / Model training switch decides, GenAI at first

    page.goto(runs_page(stack.mlflow_url, experiment.experiment_id), wait_until="load")
    page.get_by_role("columnheader", name="Dataset").first.wait_for()
    assert "/runs" in page.url, f"the runs link opened {page.url}"
    page.get_by_text("yolov5n-").first.wait_for()
    parent = next(r for r in MlflowClient(stack.mlflow_url).search_runs([experiment.experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags)  # fmt: skip
    dataset = f"validation ({parent.data.tags['data.validation_set_sha256'][:DIGEST_LENGTH]})"
    source = f"prefect:{DEPLOYMENT_NAME}"
    text = page.inner_text("body")
    assert dataset in text, f"the Dataset column does not show {dataset!r}"
    assert source in text, f"the Source column does not show {source!r}"
    page.locator(".ag-cell button").first.click()  # the parent row's expander: its variant runs below it
    page.get_by_text("fp32", exact=True).wait_for()
    close = page.get_by_role("button", name="Close")  # the MLflow Assistant side panel, when it is open
    if close.count():
        close.first.click()
    page.screenshot(path=str(out / "mlflow-runs.png"), clip={"x": 0, "y": 0, "width": 1600, "height": 360})

    page.goto(plain, wait_until="load")  # the link is not remembered; the switch is, once a user flips it
    page.wait_for_url(lambda url: "/overview" in url or "/runs" in url)
    dismiss_tip(page)
    page.get_by_text("Model training", exact=True).click()
    page.wait_for_url(lambda url: "/runs" in url)
    page.goto(plain, wait_until="load")
    page.wait_for_url(lambda url: "/overview" in url or "/runs" in url)
    remembered_landing = page.url
    assert "/runs" in remembered_landing, f"after picking Model training the experiment opened {remembered_landing}"
    return {"fresh_landing": fresh_landing, "remembered_landing": remembered_landing, "dataset": dataset}


def check_run_parameters(stack: Stack, flow_run: dict[str, Any]) -> dict[str, str]:
    """The MLflow parent run of the submitted flow run: the changed key as submitted, the others as in params.yaml."""
    from mlflow.tracking import MlflowClient

    from yoloq.config import flatten, load_params

    assert flow_run["state"]["type"] == "COMPLETED", f"the submitted run ended {flow_run['state']}"
    client = MlflowClient(stack.mlflow_url)
    experiment = client.get_experiment_by_name("yoloq")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    expected = flatten(load_params(stack.params_path, [f"gate.{CHANGED_FIELD}={CHANGED_VALUE}"]))
    different = {k: (parent.data.params.get(k), v) for k, v in expected.items() if parent.data.params.get(k) != v}
    assert not different, f"parameters of the run that differ from params.yaml + {CHANGED_FIELD}: {different}"
    return {k: parent.data.params[k] for k in ("gate.max_map_drop", "calibration.num_images", "validation.num_images")}


def run_checks(root: Path, out: Path) -> dict[str, Any]:
    """Everything in the module docstring, in `root` (servers, runs, browser profile); screenshots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with servers(root) as stack, browser_page(root / "chromium-profile") as page:
        seen: dict[str, Any] = {"form": check_prefect_form(page, stack, out)}
        flow_run = wait_for_flow_run(stack)
        seen["mlflow_params"] = check_run_parameters(stack, flow_run)
        seen["mlflow_ui"] = check_mlflow_runs(page, stack, out)
    for png in out.glob("*.png"):
        shrink(png)
    return seen


def shrink(png: Path, colors: int = 64) -> None:
    """Rewrite a screenshot with a palette of `colors` (UI screenshots stay legible, at a third of the bytes)."""
    from PIL import Image

    with Image.open(png) as image:
        small = image.convert("RGB").quantize(colors=colors)
    small.save(png, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT / "docs", help="folder of the screenshots (docs)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (servers' logs, runs)")
    args = parser.parse_args(argv)
    if chromium_path() is None:
        print("chromium is not installed: apt-get install -y chromium (Debian's package)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="yoloq-ui-"))
    try:
        seen = run_checks(root, args.out)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"form fields: {seen['form']['fields']}; backend dropdown: {seen['form']['backend_options']}")
    print(f"MLflow run parameters: {seen['mlflow_params']}")
    ui = seen["mlflow_ui"]
    print(f"MLflow: {ui['dataset']} in the Dataset column; a fresh browser lands on {ui['fresh_landing']}, after "
          f"'Model training' once on {ui['remembered_landing']}")  # fmt: skip
    print(f"screenshots: {args.out / 'prefect-custom-run.png'}, {args.out / 'mlflow-runs.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
