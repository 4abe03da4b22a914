"""``mtl-ray``: the command line.

    mtl-ray data  --config configs/quick.yaml            # split sizes and label counts, Ray Data tokenization
    mtl-ray train --config configs/quick.yaml [k.sub=v]  # one training run on Ray Train
    mtl-ray tune  --config configs/quick.yaml            # a Ray Tune sweep, winner registered as champion
    mtl-ray run   --config configs/quick.yaml [--serve]  # data -> sweep/train -> test -> register (-> serve)
    mtl-ray serve --model models:/mtl-ray-quick@champion # Ray Serve on 127.0.0.1:8000
    mtl-ray evaluate --config ... --model DIR            # an artifact's metrics on the test sets (no Ray)
    mtl-ray add-task --base models:/mtl-ray-quick@champion --config new_task.yaml  # new heads, old ones frozen

Config errors, missing data packages and wrong columns are reported before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import sys

from mtl.config import ConfigError, RunConfig, load_config
from mtl.packages import MissingPackageError
from mtl.readers import DataError


def _config(args) -> RunConfig:
    cfg = load_config(args.config, args.overrides)
    from pipelines.data import check_environment

    check_environment(cfg)
    return cfg


def cmd_data(args) -> int:
    from pipelines.data import run_data

    result = run_data(_config(args), tokenize=not args.no_tokenize)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def cmd_train(args) -> int:
    from pipelines.train import run_training

    result = run_training(_config(args), resume=args.resume)
    print(json.dumps(result.test_metrics, indent=2))
    return 0


def cmd_tune(args) -> int:
    from pipelines.tuning import run_tune

    result = run_tune(_config(args), resume=args.resume)
    print(json.dumps(result.summary(), indent=2, default=str))
    return 0


def cmd_run(args) -> int:
    from pipelines.run import run_pipeline

    run_pipeline(_config(args), serve=args.serve)
    return 0


def cmd_add_task(args) -> int:
    """Train new task heads on a frozen base model and publish base + new heads (pipelines/add_task.py).
    The config's ``model.encoder`` is replaced by the base's, so its package is not required."""
    from pipelines.add_task import add_task

    result = add_task(load_config(args.config, args.overrides), args.base, register=not args.no_register,
                      resume=args.resume)
    print(json.dumps({**result.summary(), "base": args.base}, indent=2, default=str))
    return 0


def cmd_evaluate(args) -> int:
    """Evaluate an artifact (or a checkpoint's model/) on the config's split, in-process (no Ray)."""
    import time

    from mtl.evaluation import test_report
    from mtl.model import MultiTaskModel
    from mtl.predictor import pick_device
    from mtl.registry import local_artifact
    from pipelines.data import read_tasks

    cfg = _config(args)
    data = read_tasks(cfg)
    t0 = time.time()
    model, tokenizer = MultiTaskModel.load(local_artifact(args.model, cfg.mlflow.tracking_uri), pick_device())
    rows = {t: list(d.rows(args.split)) for t, d in data.items() if t in model.tasks}
    report = test_report(model, tokenizer, rows, cfg.train.eval_batch_size)
    out = {t: {"n": r["n"], **r["metrics"]} for t, r in report.items()}
    print(json.dumps({"split": args.split, "model": args.model, "seconds": round(time.time() - t0, 1),
                      "metrics": out}, indent=2))
    return 0


def cmd_serve(args) -> int:
    from pipelines.serving import run_server

    cfg = load_config(args.config, args.overrides) if args.config else None
    run_server(args.model, cfg, host=args.host, port=args.port, quantize=args.quantize,
               tracking_uri=args.tracking_uri, blocking=True)
    return 0


def cmd_k8s(args) -> int:
    """Write the RayJob and RayService manifests for a run config (see pipelines/k8s.py)."""
    from pipelines.k8s import write_manifests

    paths = write_manifests(args.config, args.out, args.overrides, image=args.image, storage=args.storage,
                            tracking_uri=args.tracking_uri, name=args.name, model=args.model)
    for path in paths.values():
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtl-ray", description="Multi-task fine-tuning on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p, required=True):
        p.add_argument("--config", required=required, help="YAML run config")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
        return p

    p = with_config(sub.add_parser("data", help="read, split and tokenize every task; print sizes and label counts"))
    p.add_argument("--no-tokenize", action="store_true", help="stop after reading and splitting (no Ray)")
    p.add_argument("--json", action="store_true", help="also print the counts as JSON")
    p.set_defaults(func=cmd_data)

    p = with_config(sub.add_parser("train", help="one training run on Ray Train"))
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir/name from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = with_config(sub.add_parser("tune", help="a Ray Tune sweep; the best trial is registered as champion"))
    p.add_argument("--resume", action="store_true", help="restore an interrupted sweep")
    p.set_defaults(func=cmd_tune)

    p = with_config(sub.add_parser("run", help="the whole pipeline: data, sweep or train, test, register"))
    p.add_argument("--serve", action="store_true", help="serve the champion afterwards and print a sample request")
    p.set_defaults(func=cmd_run)

    p = with_config(sub.add_parser("add-task", help="add new task heads to a trained model; its encoder and "
                                   "old heads stay unchanged"))
    p.add_argument("--base", required=True, help="the model to grow: models:/<name>@<alias>, models:/<name>/<n>, "
                   "runs:/<id>/model, an artifact directory or an object-storage URI")
    p.add_argument("--no-register", action="store_true", help="do not register the result (it is still logged "
                   "to MLflow when mlflow.enabled)")
    p.add_argument("--resume", action="store_true", help="continue the last add-task run of this name from its "
                   "last checkpoint, on the base version it started from")
    p.set_defaults(func=cmd_add_task)

    p = with_config(sub.add_parser("evaluate", help="metrics of a model artifact on the config's test (or other) split"))
    p.add_argument("--model", required=True, help="artifact directory, models:/<name>@<alias> or runs:/<id>/model")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.set_defaults(func=cmd_evaluate)

    p = with_config(sub.add_parser("serve", help="serve a model artifact or models:/ URI on Ray Serve"), required=False)
    p.add_argument("--model", required=True, help="artifact directory, models:/<name>@<alias> or runs:/<id>/model")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1 or the config's serve.host)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--quantize", action="store_true", default=None, help="int8 dynamic quantization (CPU)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ URIs")
    p.set_defaults(func=cmd_serve)

    p = with_config(sub.add_parser("k8s", help="KubeRay manifests (RayJob + RayService) from a run config"))
    p.add_argument("--image", default=None, help="the image built from deploy/Dockerfile (default mtl-ray:<version>-cpu/-gpu)")
    p.add_argument("--storage", default=None, help="object storage for output_dir: s3://, gs:// or abfs:// (default: the config's)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking server, http(s):// or databricks (default: the config's)")
    p.add_argument("--name", default=None, help="base name of the Kubernetes objects (default: the config's name)")
    p.add_argument("--model", default=None, help="what the RayService serves (default models:/<registered_model>@champion; "
                   "a version, models:/<name>/<n>, pins every replica to it and rolls it out on apply)")
    p.add_argument("--out", default="deploy/k8s", help="folder for rayjob.yaml and rayservice.yaml")
    p.set_defaults(func=cmd_k8s)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.ray_utils import set_ray_env

    set_ray_env()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, MissingPackageError, DataError, FileNotFoundError) as err:
        print(f"mtl-ray: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
