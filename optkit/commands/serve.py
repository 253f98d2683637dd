"""``optkit serve``: the OpenAI-compatible HTTP server and web page for one model."""

from __future__ import annotations

import argparse
import logging

from optkit.commands.loading import add_loading_options, load_model

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  optkit serve --model alpa/opt-125m --path ~/opt_weights --port 10001
  optkit serve --model jax/opt-1.3b --dummy --max-num-seqs 32   # random weights, any size
  optkit serve --fake                                           # no model: UI and API work

sizing: each engine step computes at most --max-batched-tokens new tokens: one for every
running sequence, the rest for chunks of waiting prompts, so a long prompt never freezes the
streams already running (on GPUs, where step shapes are static, the prompt chunks have all
of it and the decodes come on top).  The KV cache is --num-blocks blocks of --block-size
tokens (by default they fill --kv-memory-fraction of each GPU's memory, weights and a step's
activations included, up to twice what --max-num-seqs full-length sequences hold; on CPUs
room for --max-num-seqs sequences of 512 tokens); sequences hold only the blocks they have
written, share cached prompt blocks, and are preempted (recomputed later) when blocks run out.

then open http://127.0.0.1:10001/ or point any OpenAI client at http://127.0.0.1:10001/v1
(curl http://127.0.0.1:10001/v1/completions -H 'Content-Type: application/json' \\
   -d '{"model": "alpa/opt-125m", "prompt": "Paris is", "max_tokens": 16}')"""


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over HTTP (OpenAI API + web page)",
        description="Serve an OPT model with continuous batching behind an OpenAI-compatible "
                    "/v1/completions API, a web page at /, /health and Prometheus /metrics.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="alpa/opt-125m",
                   help="jax/opt-* (one device) or alpa/opt-* (all devices) "
                        "(default: %(default)s)")
    g.add_argument("--path", help="folder holding {name}-np/ (or the folder / an HF dir)")
    g.add_argument("--dummy", action="store_true", help="random weights of the named size")
    g.add_argument("--fake", action="store_true",
                   help="no model: the hand-checkable fake engine (each character is "
                        "followed by the next letter)")
    g.add_argument("--tokenizer", help="tokenizer folder (default: optkit's embedded one)")
    add_loading_options(g)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default %(default)s; 0.0.0.0 exposes it to the "
                        "network)")
    g.add_argument("--port", type=int, default=10001, help="(default: %(default)s)")
    g.add_argument("--api-keys", metavar="FILE",
                   help="require 'Authorization: Bearer KEY' on the API (not on /, /health, "
                        "/metrics, /docs): one 'KEY [WEIGHT]' per line, the key being "
                        "everything up to the first whitespace ('#' included); comments only "
                        "on lines starting with '#'; heavier keys get a larger share of the "
                        "engine while requests wait (default weight 1)")
    g.add_argument("--allowed-hosts", nargs="+", metavar="HOST",
                   help="Host header names accepted besides localhost / 127.0.0.1 / [::1] "
                        "(any port; '*.example.com' matches subdomains; '*' accepts any). "
                        "Without it, only requests arriving on a loopback address are "
                        "checked (against DNS rebinding from a browser); with it, every "
                        "request is; others get 400")
    g.add_argument("--max-body-bytes", type=positive_int, metavar="N",
                   help="largest request body in bytes; larger ones get 413 before they "
                        "are read (default: 4 MiB)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on Ctrl-C / SIGTERM, new requests get 503 and running sequences get "
                        "this long to finish; streams still open then end with an error "
                        "event and [DONE] (default: %(default)s)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-num-seqs", type=int,
                   help="sequences in flight at most (default: 64 on GPUs, 16 on CPUs; "
                        "pipeline and Ray executors: the slots of their fixed cache)")
    g.add_argument("--max-len", type=int,
                   help="tokens (prompt + completion) per sequence (default: the model's "
                        "context)")
    g.add_argument("--max-prompt-len", type=int, help="longest prompt accepted (tokens)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="sequences waiting to start before requests get 429 "
                        "(default: %(default)s)")
    g.add_argument("--max-tokens-in-flight", type=int,
                   help="cap on prompt + max_tokens summed over running sequences")
    g.add_argument("--max-n", type=int, default=16, help="largest n / best_of (default: 16)")
    g.add_argument("--steps-per-dispatch", type=int, default=4,
                   help="decode steps per device call while no request waits (default: 4)")
    g.add_argument("--no-warmup", action="store_true", help="compile on the first request")
    g = p.add_argument_group("engine (paged KV cache)")
    g.add_argument("--max-batched-tokens", type=int,
                   help="new tokens one step computes: running decodes first, then prompt "
                        "chunks (on GPUs: prompt tokens, the decodes on top); smaller keeps "
                        "streams smoother while long prompts arrive, larger prefills faster "
                        "(default: 2048 on GPUs, 128 on CPUs)")
    g.add_argument("--block-size", type=int, default=16,
                   help="tokens per KV-cache block (default: %(default)s)")
    g.add_argument("--num-blocks", type=int,
                   help="KV-cache blocks in the pool (default: sized by "
                        "--kv-memory-fraction on GPUs; on CPUs --max-num-seqs x 512 tokens)")
    g.add_argument("--kv-memory-fraction", type=float, default=0.9,
                   help="without --num-blocks, KV blocks fill each GPU's memory up to this "
                        "share of it, weights included (default: %(default)s)")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="never share cached prompt blocks between requests")
    p.set_defaults(func=run)


def build_app(args):
    from optkit.serve import (
        CharCodec,
        FakeEngine,
        Limits,
        Metrics,
        Scheduler,
        create_app,
        read_api_keys,
        serve_app,
    )
    from optkit.serve.guard import MAX_BODY_BYTES

    if not args.shutdown_timeout >= 0:
        raise ValueError("--shutdown-timeout must be >= 0 seconds")
    keys = read_api_keys(args.api_keys) if args.api_keys else None
    guard = dict(max_body_bytes=args.max_body_bytes or MAX_BODY_BYTES,
                 allowed_hosts=args.allowed_hosts)
    limits = Limits(max_queue=args.max_queue, max_prompt_len=args.max_prompt_len,
                    max_tokens_in_flight=args.max_tokens_in_flight)
    if args.fake:
        engine = FakeEngine(max_slots=args.max_num_seqs or 16, max_len=args.max_len or 2048,
                            step_delay=0.02, max_batched_tokens=args.max_batched_tokens or 64,
                            num_blocks=args.num_blocks)
        scheduler = Scheduler(engine, CharCodec(), limits, weights=keys,
                              steps_per_dispatch=args.steps_per_dispatch, metrics=Metrics())
        return create_app(scheduler, scheduler.codec, "fake", api_keys=keys, max_n=args.max_n,
                          **guard)

    from optkit import get_tokenizer
    from optkit.serve.engine import describe

    if args.model.startswith("facebook/"):
        raise ValueError("serving runs on JAX: use jax/opt-* or alpa/opt-* (the same weights)")
    if not args.dummy and not args.path:
        raise ValueError("pass --path DIR (the folder holding {name}-np/) or --dummy")
    model = load_model(args)
    log.info("loaded %r", model)
    app = serve_app(model, get_tokenizer(args.tokenizer), name=args.model,
                    max_num_seqs=args.max_num_seqs, max_len=args.max_len,
                    max_batched_tokens=args.max_batched_tokens, block_size=args.block_size,
                    num_blocks=args.num_blocks, memory_fraction=args.kv_memory_fraction,
                    prefix_caching=not args.no_prefix_caching, limits=limits,
                    api_keys=keys, steps_per_dispatch=args.steps_per_dispatch,
                    max_n=args.max_n, warmup=not args.no_warmup, **guard)
    log.info("%s", describe(app.state.scheduler.engine))
    return app


def run(args) -> int:
    from optkit.serve.server import run as run_server

    app = build_app(args)
    where = f"http://{args.host}:{args.port}"
    print(f"optkit serve: {where}/ (web page), {where}/v1 (OpenAI API); Ctrl-C stops",
          flush=True)
    run_server(app, host=args.host, port=args.port, log_level=args.log_level,
               shutdown_timeout=args.shutdown_timeout)
    return 0
