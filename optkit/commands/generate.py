"""``optkit generate``: complete prompts with any backend, streaming the text."""

from __future__ import annotations

import argparse
import sys
import time

from optkit.commands.loading import add_loading_options, load_model


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from prompts",
                       description="Complete prompts with an OPT model (greedy by default; "
                       "sampling, beam search and stop strings as in HF generate). Each completion "
                       "is printed as its prompt followed by the generated text, then the "
                       "finish reason ([stop] or [length]) on its own line, with a blank line "
                       "between completions; with one prompt and a JAX backend the text "
                       "streams as it is generated.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="jax/opt-125m",
                   help="facebook/opt-*, jax/opt-* or alpa/opt-*")
    p.add_argument("--path", help="folder holding {name}-np/ (or the folder / an HF dir); "
                   "default: facebook/{name} from the Hugging Face cache (or the Hub)")
    p.add_argument("--dummy", action="store_true", help="random weights instead of --path")
    p.add_argument("--tokenizer", help="tokenizer folder; optkit's embedded one if not given")
    p.add_argument("--prompt", action="append",
                   help="prompt text (repeat for a batch); a built-in one if not given")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    add_loading_options(p)
    g = p.add_argument_group("decoding")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from optkit import get_tokenizer
    from optkit.generation import generate_text

    prompts = args.prompt or ["Paris is the capital city of"]
    kw = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
              repetition_penalty=args.repetition_penalty,
              no_repeat_ngram_size=args.no_repeat_ngram_size)
    if args.do_sample:
        kw.update(do_sample=True, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed)
    tok = get_tokenizer(args.tokenizer)
    _check_settings(args.model, max(len(tok(p)["input_ids"]) for p in prompts), kw)
    t0 = time.perf_counter()
    model = load_model(args)
    t1 = time.perf_counter()
    if getattr(model, "backend", "facebook") == "facebook":
        if args.stop:
            raise ValueError("--stop needs a JAX backend (jax/ or alpa/)")
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="np", padding=True)
        kw.pop("seed", None)
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             **kw)
        for i, (prompt, row) in enumerate(zip(prompts, out, strict=True)):
            new = row[enc["input_ids"].shape[1]:]
            reason = "stop" if tok.eos_token_id in new.tolist() else "length"
            show(i, prompt, tok.decode(new, skip_special_tokens=True), reason)
    else:
        stream = len(prompts) == 1 and args.num_beams == 1
        if stream:
            print(prompts[0], end="", flush=True)
        done = generate_text(model, tok, prompts, stop=args.stop,
                             on_text=(lambda row, text: print(text, end="", flush=True))
                             if stream else None, **kw)
        for i, (prompt, c) in enumerate(zip(prompts, done, strict=True)):
            show(i, prompt, c.text, c.finish_reason, streamed=stream)
    t2 = time.perf_counter()
    print(f"# {model!r}: load {t1 - t0:.1f}s, generate {t2 - t1:.2f}s", file=sys.stderr)
    return 0


def show(index: int, prompt: str, text: str, reason: str, streamed: bool = False) -> None:
    """One completion as the prompt followed by its continuation, then ``[finish reason]``
    on a line of its own; completions are separated by a blank line. Streaming prints the
    same characters as they come."""
    if not streamed:
        print(("\n" if index else "") + prompt + text, end="")
    print(f"\n[{reason}]", flush=True)


def _check_settings(model: str, prompt_length: int, kw: dict) -> None:
    """Reject out-of-range decoding settings for prompts of up to ``prompt_length`` tokens
    before a model is loaded (which can take minutes), against the named size's config; a
    name optkit does not know is left to ``get_model`` to explain."""
    from optkit.config import OPTConfig
    from optkit.generation.config import resolve

    try:
        cfg = OPTConfig.from_name(model)
    except (KeyError, ValueError):
        return
    resolve(cfg, prompt_length, **kw)
