"""The process `cptkit serve` starts: MLflow's scoring server app (the one `mlflow models serve` runs, POST
/invocations) around the model, with each request's generation parameters checked first.

MLflow checks a parameter's type only against the signature, answers a wrong one with its stack trace,
and has no upper bound: a request for 10^8 new tokens would hold a worker for hours. Here such a request
gets HTTP 400 and one line naming the parameter, before the model sees it.

Run as `python -m cptkit.scoring_server MODEL_URI HOST PORT MAX_NEW_TOKENS_LIMIT`; MLflow finds the tracking
and registry stores through MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from cptkit.errors import CptkitError

PARAMS = "params"
MAX_NEW_TOKENS = "max_new_tokens"
LIMIT_KEY = "serve.max_new_tokens_limit"


def params_problem(payload: Any, params_schema: Any, limit: int) -> str | None:
    """Why the generation parameters of a JSON request cannot be used, in one line, or None. Parameters
    are read where MLflow reads them: under "params", or for the chat/completions request formats the
    top-level keys the signature declares. Anything else about the request is left to MLflow."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.utils.serving_data_parser import is_unified_llm_input
    from mlflow.types.schema import ParamSpec

    if not isinstance(payload, dict):
        return None
    specs = {spec.name: spec for spec in params_schema.params} if params_schema is not None else {}
    if is_unified_llm_input(payload):
        params: Any = {k: v for k, v in payload.items() if k in specs}
    else:
        params = payload.get(PARAMS)
    if params is None:
        return None
    if not isinstance(params, dict):
        return f"{PARAMS} must be a JSON object, got {_short(params)}"
    if MAX_NEW_TOKENS in params:
        n = params[MAX_NEW_TOKENS]
        where = f"{PARAMS}.{MAX_NEW_TOKENS}"
        if isinstance(n, bool) or not isinstance(n, int):
            return f"{where}: {_short(n)} is not a whole number"
        if n < 1:
            return f"{where}: {n} must be at least 1"
        if n > limit:
            return f"{where}: {n} is over this server's limit of {limit} ({LIMIT_KEY})"
    for name, value in params.items():
        if name in specs:
            try:
                ParamSpec.validate_param_spec(value, specs[name])
            except MlflowException as exc:
                return f"{PARAMS}.{name}: {_first_line(exc.message)}"
    return None


def create_app(model_uri: str, limit: int) -> Any:
    """MLflow's scoring app for the model at `model_uri`, refusing requests whose parameters `params_problem`
    rejects."""
    import json

    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from mlflow.pyfunc import scoring_server

    from cptkit.secrets import Secrets, env_secrets
    from cptkit.tracking import vendor_errors

    # cptkit serve resolved the store and passed it in the environment, as MLflow reads it.
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    with vendor_errors(tracking_uri, f"load {model_uri}", Secrets(env_secrets())):
        model = scoring_server.load_model_with_mlflow_config(model_uri)  # type: ignore[no-untyped-call]
    app = scoring_server.init(model)
    params_schema = model.metadata.get_params_schema()

    async def check_params(request: Request, call_next: Any) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if request.method == "POST" and request.url.path == "/invocations" and content_type == "application/json":
            try:
                payload = json.loads(await request.body())
            except ValueError:
                payload = None  # MLflow answers a body that is not JSON
            problem = params_problem(payload, params_schema, limit)
            if problem is not None:
                return JSONResponse({"error_code": "INVALID_PARAMETER_VALUE", "message": problem}, status_code=400)
        response: Response = await call_next(request)
        return response

    app.middleware("http")(check_params)
    return app


def main(argv: list[str]) -> int:
    import uvicorn

    model_uri, host, port, limit = argv
    try:
        app = create_app(model_uri, int(limit))
    except CptkitError as exc:
        print(f"error: serve: {exc}", file=sys.stderr)
        return 1
    uvicorn.run(app, host=host, port=int(port))
    return 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else "invalid value"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
