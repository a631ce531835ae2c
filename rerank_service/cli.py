"""`rerank-service serve | check-config | rerank | health | models | usage`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import ipaddress
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service import __version__
from rerank_service.config import ConfigError, Settings, add_serve_arguments, ca_bundle, load_settings
from rerank_service.config.file_trust import flush_held_warnings
from rerank_service.config.secret import UnreadableKeyFile, file_named, read_key_file, url_named
from rerank_service.observability.logging import configure_logging

EXIT_CONFIG_ERROR = 2
# top_n is an int32 in the contract: protobuf refuses a larger one with a traceback.
MAX_TOP_N = 2**31 - 1
# A client command's deadline: a day is longer than any call; past that grpc's deadline
# arithmetic misbehaves (an infinite or huge one expires at once, DEADLINE_EXCEEDED).
MAX_TIMEOUT_S = 86_400.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG_ERROR
    handler = {
        "serve": _serve,
        "check-config": _check_config,
        "rerank": _rerank,
        "health": _health,
        "models": _models,
        "usage": _usage,
    }[args.command]
    try:
        return handler(args)
    except ConfigError as exc:  # a client command's bad TLS files (serve reports its own)
        print(f"rerank-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


class _Parser(argparse.ArgumentParser):
    """A usage error in one line and exit 2, as a bad setting of serve's (docs/OPERATIONS.md);
    the subcommands' parsers are of this class too.

    No abbreviations: argparse would take `--api-keys X` (no such flag) as --api-keys-file X,
    and a flag added later would change what an abbreviation means."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG_ERROR, f"{self.prog}: error: {_unrepeated(message)}; see {self.prog} --help\n")


# A token argparse did not take that names an option (-d, --upstream-api-key), cut at '='.
_OPTION = re.compile(r"-[A-Za-z]|--[A-Za-z][A-Za-z0-9_-]*")


def _unrepeated(message: str) -> str:
    """argparse's message without the values it would repeat: what it did not recognise, or
    the word it took for the command, may be the key given to a flag that does not exist
    (`--upstream-api-key sk-...`), and keys never appear in an error (CONFIGURATION.md#secrets).
    The options are named, without their values."""
    unrecognized = "unrecognized arguments: "
    if message.startswith(unrecognized):
        tokens = message.removeprefix(unrecognized).split()
        options = [token.partition("=")[0] for token in tokens]
        named = [option for option in options if _OPTION.fullmatch(option)]
        left_out = len(named) < len(tokens) or any("=" in token for token in tokens)
        return unrecognized + " ".join([*named, "(values not repeated)"] if left_out else named)
    invalid_command = "argument COMMAND: invalid choice: "
    if message.startswith(invalid_command):
        _, _, choices = message.rpartition(" (choose from ")
        return f"argument COMMAND: invalid choice, not repeated (choose from {choices}"
    return message


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rerank-service", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server")
    add_serve_arguments(serve)

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file (and the environment) as serve would, without serving",
    )
    check.add_argument("file", type=Path, help="the YAML file serve would take with --config")

    rerank = commands.add_parser("rerank", help="rank documents through a running server")
    _add_client_arguments(rerank)
    rerank.add_argument(
        "--model", type=_text, default=None, help="model name (default: the server's first model)"
    )
    rerank.add_argument("--query", type=_text, required=True, help="the query")
    rerank.add_argument(
        "--document",
        "-d",
        type=_text,
        action="append",
        required=True,
        dest="documents",
        help="a document (repeat)",
    )
    rerank.add_argument(
        "--top-n", type=_top_n, default=None, help=f"return only the best N (1 to {MAX_TOP_N})"
    )
    rerank.add_argument("--instruct", type=_text, default=None, help="task instruction")
    rerank.add_argument("--return-documents", action="store_true", help="print the document texts")
    rerank.add_argument("--json", action="store_true", help="print the response as JSON")

    health = commands.add_parser("health", help="ask a running server's health service")
    _add_client_arguments(health)
    health.add_argument("--service", type=_text, default="", help="service name ('' = whole server)")

    models = commands.add_parser("models", help="list the models a running server serves")
    _add_client_arguments(models)

    usage = commands.add_parser(
        "usage", help="print each caller's usage as a table, from a running server's Prometheus endpoint"
    )
    usage.add_argument(
        "--metrics", required=True, metavar="URL", help="the server's /metrics URL (http://HOST:PORT/metrics)"
    )
    return parser


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", type=_text, default="localhost:50051", help="server address (default localhost:50051)"
    )
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key-file",
        type=str,  # the text as given, for errors: a Path drops a leading ./ (secret.file_named)
        default=None,
        help="file holding the bearer key to send (default: env RERANK_API_KEY)",
    )
    keys.add_argument(
        "--api-key",
        type=_text,
        default=None,
        help="bearer key to send; it shows in `ps`: prefer RERANK_API_KEY or --api-key-file",
    )
    parser.add_argument(
        "--timeout", type=_timeout, default=30.0, help="deadline in seconds (default 30, at most a day)"
    )
    tls = parser.add_argument_group("TLS (default: plaintext)")
    tls.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA certificates")
    tls.add_argument("--tls-ca", type=Path, default=None, help="PEM CA bundle to trust (turns TLS on)")
    tls.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate, for mTLS")
    tls.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")


def _text(value: str) -> str:
    """An argument protobuf and grpc can send: the OS hands over bytes that are not UTF-8 as
    surrogates, which neither can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text: check the shell's encoding") from None
    return value


def _top_n(value: str) -> int:
    try:
        top_n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {value!r}") from None
    if not 1 <= top_n <= MAX_TOP_N:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_TOP_N}, not {top_n}")
    return top_n


def _timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {value!r}") from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S):
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_TIMEOUT_S:.0f} seconds (a day), not {value}"
        )
    return seconds


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the server: plaintext, or TLS when any TLS flag is given. The TLS files
    are checked first as serve checks its own (config/tls_files.py): grpc would report a
    file that is no PEM only as UNAVAILABLE after several lines of its own log, which from
    `health` as a probe reads as a server down."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("tls-cert and tls-key go together: set both to send a client certificate")
    options = _channel_options(args.target)
    if not (args.tls or args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.target, options=options)
    from rerank_service.config.server import TlsConfig  # late: `rerank --help` stays fast
    from rerank_service.config.tls_files import read_tls

    root = None  # None: the system's CAs
    if args.tls_ca is not None:
        root = _read_pem("tls-ca", args.tls_ca)  # a file it cannot read: said so first
        ca_bundle(args.tls_ca, "tls_ca")  # as serve checks its tls-client-ca; the error names tls-ca
    # tls-cert and tls-key, read and checked as serve's: PEM, a pair, not encrypted.
    client = read_tls(TlsConfig(cert=args.tls_cert, key=args.tls_key, client_ca=None))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(args.target, credentials, options=options)


def _channel_options(target: str) -> list[tuple[str, int]]:
    """No receive limit of the client's own (-1), as clients/python's CHANNEL_OPTIONS: the
    server bounds both ways (--max-message-bytes, 16 MiB by default), and grpc's 4 MiB default
    would fail an answer the server had already ranked and billed (--return-documents over
    large documents). No proxy for this machine's own server: grpc dials through a lowercase
    grpc_proxy/https_proxy/http_proxy unless no_proxy names the host, so a pod given one for
    its upstream would fail its own `health --target localhost:PORT` probe."""
    options = [("grpc.max_receive_message_length", -1)]
    if _loopback(target):
        options.append(("grpc.enable_http_proxy", 0))
    return options


def _loopback(target: str) -> bool:
    """Whether a grpc target (HOST:PORT, dns:, ipv4:, ipv6:, unix:) names only this machine:
    localhost, 127.0.0.0/8, [::1] or a unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    scheme, colon, addresses = target.partition(":")
    if not (colon and scheme in ("dns", "ipv4", "ipv6")):
        addresses = target  # HOST:PORT, dns's by default
    elif addresses.startswith("//"):  # dns://AUTHORITY/HOST:PORT
        addresses = addresses[2:].partition("/")[2]
    return all(_loopback_address(address) for address in addresses.split(","))  # ipv4:A,B


def _loopback_address(address: str) -> bool:
    if address.startswith("["):  # [IPv6]:PORT
        host = address[1:].partition("]")[0]
    elif address.count(":") == 1:
        host = address.partition(":")[0]
    else:  # no port, or a bare IPv6 address
        host = address
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another name
        return False


def _read_pem(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name} {path}: cannot read it ({exc.strerror or exc})") from None


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(vars(args))
    except ConfigError as exc:
        print(f"rerank-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    configure_logging(settings.log_format, settings.log_level, settings.secrets(), cache_loggers=True)
    flush_held_warnings()  # a key file's, found while the settings loaded
    if settings.workers > 1:  # a supervisor and its workers (docs/OPERATIONS.md#workers)
        return _supervise(settings, args)
    # Imported late: `rerank --help` stays fast.
    from rerank_service.server import ignore_sighup_to_the_end, serve

    async def serving() -> int:
        try:
            return await serve(settings, reload=lambda: load_settings(vars(args)))
        finally:
            ignore_sighup_to_the_end()  # a hangup as the drained server exits must not kill it

    try:
        return asyncio.run(serving())
    except ConfigError as exc:  # found while building the backend (a missing extra, say)
        print(f"rerank-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (RuntimeError, OSError) as exc:  # a port taken: server.ListenError names its setting
        print(f"rerank-service: cannot start: {exc}", file=sys.stderr)
        return 1


def _supervise(settings: Settings, args: argparse.Namespace) -> int:
    from rerank_service.workers import supervise  # imported late, as serve is

    try:
        return supervise(settings, vars(args))
    except ConfigError as exc:  # workers that make no sense with this backend
        print(f"rerank-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except OSError as exc:  # for example: the port is taken
        print(f"rerank-service: cannot start: {exc}", file=sys.stderr)
        return 1


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str | bytes], ...]:
    if args.api_key:
        # Every user of the machine can read a process's arguments.
        print("rerank-service: warning: --api-key shows the key in `ps`; use RERANK_API_KEY "
              "or --api-key-file", file=sys.stderr)  # fmt: skip
    key, source = _chosen_key(args)
    if not key:
        return ()
    # grpc refuses any other byte in a header as INTERNAL "Invalid metadata", naming nothing;
    # a space is one no server key holds (its key sources refuse one), as the clients say.
    if any(not "\x21" <= char <= "\x7e" for char in key):
        raise ConfigError(_not_a_key(source))
    return (("authorization", f"Bearer {key}"),)


def _chosen_key(args: argparse.Namespace) -> tuple[str | None, str]:
    """The key to send, and where it came from (for an error, which never shows the key).

    Each source is stripped as a key file is: an env file or secret written with `echo` ends
    the key with a newline, which no header can carry; blank means no key."""
    flag = (args.api_key or "").strip()
    if flag:
        return flag, "api-key"
    if args.api_key_file is not None:
        return _read_key_file(args.api_key_file), f"api-key-file {file_named(args.api_key_file)}"
    return (os.environ.get("RERANK_API_KEY") or "").strip() or None, "RERANK_API_KEY"


def _read_key_file(path: str) -> str:
    """The key in `path`, as the server reads a key file (secret.read_key_file: a path is
    named only when it reads as one, so a key pasted where the file goes is not repeated)."""
    try:
        key = read_key_file(path).strip()
    except UnreadableKeyFile as exc:
        raise ConfigError(f"api-key-file {exc}") from None
    if not key:
        raise ConfigError(f"api-key-file {file_named(path)} holds no key")
    return key


def _not_a_key(source: str) -> str:
    return f"{source}: the key must be printable ASCII (letters, digits, punctuation; no spaces)"


def _rerank(args: argparse.Namespace) -> int:
    request = rerank_pb2.RerankRequest(
        query=args.query, documents=args.documents, return_documents=args.return_documents
    )
    if args.top_n is not None:
        request.top_n = args.top_n
    if args.instruct is not None:
        request.instruct = args.instruct
    metadata = _metadata(args)
    with _channel(args) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        try:
            if args.model is None:  # the server knows what it serves: take its first model
                listed = stub.ListModels(
                    rerank_pb2.ListModelsRequest(), metadata=metadata, timeout=args.timeout
                )
                args.model = listed.models[0].name if listed.models else ""
            request.model = args.model
            response = stub.Rerank(request, metadata=metadata, timeout=args.timeout)
        except grpc.RpcError as exc:
            return _print_rpc_error(exc)
    if args.json:
        from google.protobuf import json_format

        print(
            json.dumps(
                json_format.MessageToDict(
                    response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                ),
                indent=2,
            )
        )
        return 0
    print(f"request_id: {response.request_id}   total_tokens: {response.usage.total_tokens}")
    for rank, result in enumerate(response.output.results, start=1):
        line = f"{rank:>3}. [{result.index}] {result.relevance_score:.4f}"
        if result.HasField("document"):
            line += f"  {result.document.text}"
        print(line)
    return 0


def _health(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            # The health service answers a name it does not know NOT_FOUND with no details.
            return _print_rpc_error(exc, not_found=f"no health service named {args.service!r}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def _models(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        try:
            response = rerank_pb2_grpc.RerankServiceStub(channel).ListModels(
                rerank_pb2.ListModelsRequest(), metadata=_metadata(args), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            return _print_rpc_error(exc)
    for model in response.models:
        instruct = "honours instruct" if model.supports_instruct else "ignores instruct"
        upstream = f"  format={model.format}  upstream={model.upstream_url}" if model.format else ""
        print(
            f"{model.name}  backend={model.backend}{upstream}  max_documents={model.max_documents}  "
            f"max_query_tokens={model.max_query_tokens}  {instruct}"
        )
        if len(model.deployments) > 1:
            for deployment in model.deployments:
                print("  - " + _deployment_line(deployment))
    return 0


def _deployment_line(deployment: rerank_pb2.DeploymentInfo) -> str:
    state = rerank_pb2.DeploymentState.Name(deployment.state).removeprefix("DEPLOYMENT_STATE_").lower()
    where = f"  format={deployment.format}  upstream={deployment.upstream_url}" if deployment.format else ""
    return (
        f"{deployment.name}  backend={deployment.backend}{where}  priority={deployment.priority}  "
        f"weight={deployment.weight}  {state}"
    )


def _check_config(args: argparse.Namespace) -> int:
    """Load the file, build every route and find every local model's files as `serve --config
    FILE` would (loading no model); 0 when it would start."""
    settings = load_settings({"config": str(args.file)})
    # What serve would warn of as it starts (a key file others may read), on stderr.
    configure_logging(settings.log_format, settings.log_level, settings.secrets())
    flush_held_warnings()
    from rerank_service.routing.build import checked_routes  # late, as serve

    routes = checked_routes(settings)
    _check_start_up_files(settings)
    deployments = {id(member.deployment) for route in routes for member in route.members}
    callers = f", {len(settings.callers)} callers" if settings.callers else ""
    # A name's byte that is not UTF-8 (a surrogate here) as its escape, as on stderr and in the
    # log: a UTF-8 stdout would refuse it, after the file had been checked.
    named = os.fsdecode(args.file).encode("utf-8", "backslashreplace").decode("utf-8")
    print(f"{named}: ok: {len(routes)} routes, {len(deployments)} deployments{callers}")
    for route in routes:
        members = ", ".join(
            f"{m.deployment.name} (priority {m.priority}, weight {m.weight})" for m in route.members
        )
        print(f"  {route.name}: {members}")
    return 0


def _check_start_up_files(settings: Settings) -> None:
    """What serve checks as it starts, besides the routes: the TLS files, the workers against
    the local backend, the usage log's place (not created here), the Redis CA bundles, and
    tracing's OTEL_* settings (its exporter made, then shut down unused)."""
    from rerank_service.api.grpc.tls import server_credentials
    from rerank_service.config.server import ServerConfig
    from rerank_service.pipeline.usage import check_usage_log
    from rerank_service.workers import check_workers

    server_credentials(ServerConfig.from_settings(settings).tls)
    check_workers(settings)
    check_usage_log(settings.usage_log)
    for setting in ("cache_store_ca_file", "limits_store_ca_file"):
        path = getattr(settings, setting)
        if path is not None:
            ca_bundle(path, setting)
    _check_tracing(settings.otlp_endpoint)


def _check_tracing(otlp_endpoint: str | None) -> None:
    """What serve's tracer refuses as it starts (server.start_call_tracer): a protocol it
    does not speak, OpenTelemetry's SDK not installed, or an OTEL_* value its exporter,
    sampler or batch processor cannot start with (an endpoint, a TLS file, a sampler's name
    or ratio: made as serve makes them, the exporter then shut down)."""
    from rerank_service.observability.tracing import otlp_protocol, tracing_wanted
    from rerank_service.server import tracing_sdk

    if not tracing_wanted(otlp_endpoint, os.environ):
        return
    try:
        otlp_protocol(os.environ)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    tracing_sdk()
    from rerank_service.observability.tracing_export import check_tracing  # installed: tracing_sdk

    try:
        check_tracing(otlp_endpoint)
    except ValueError as exc:  # an OTEL_* value, named in the message
        raise ConfigError(str(exc)) from None


def _usage(args: argparse.Namespace) -> int:
    from rerank_service.observability.usage_report import fetch_usage, table

    shown = url_named(args.metrics)  # a user:password@ in it is never printed
    if shown != args.metrics:
        # urllib sends no user:password@ of a URL (it reads it as part of the host name), and
        # its error would quote what it made of the password.
        print(f"error: cannot read {shown}: a user or password in the URL is not supported", file=sys.stderr)
        return 1
    try:
        # This machine's own server is read past a proxy, as the gRPC commands read it.
        host = urlsplit(args.metrics).hostname or ""
        usage = fetch_usage(args.metrics, direct=_loopback_address(host))
    except (OSError, ValueError, http.client.HTTPException) as exc:  # InvalidURL: a port that is no number
        print(f"error: cannot read {shown}: {exc}", file=sys.stderr)
        return 1
    if not usage.by_model and not usage.limited:
        print("no caller has called yet")
        return 0
    print(table(usage))
    return 0


def _print_rpc_error(exc: grpc.RpcError, not_found: str = "") -> int:
    """Print the call's status in one line; `not_found`: what a NOT_FOUND without details means."""
    # Errors raised by a call are also grpc.Call objects, with a code and details.
    code = getattr(exc, "code", lambda: None)()
    details = getattr(exc, "details", lambda: str(exc))()
    if code == grpc.StatusCode.NOT_FOUND and not details and not_found:
        details = not_found
    print(f"error: {code.name if code else 'UNKNOWN'}: {details}", file=sys.stderr)
    return 1
