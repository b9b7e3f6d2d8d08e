"""Tokenize, mask, pack and shard training data.

Pipeline: records -> (text, trainable?) segments -> token ids + a per-token loss mask, stored as one
flat token array with document offsets (in memory, or memory-mapped .bin files for large corpora)
-> rows of `seq_len` tokens -> batches, each rank taking a disjoint share.

Sources (`load_documents`):
- `arith`: built-in two-digit addition ("37+45=" -> "082"), no download; a 0.5M-parameter model learns
  it on CPU in well under a minute, and exact-match accuracy on held-out sums proves the pipeline.
- `.txt`: each paragraph (text between blank lines) is a document. `.jsonl`: one record per line. `.json`: a list of records.
  `.parquet` (with pyarrow) and a folder saved by datasets' save_to_disk (with datasets): one record per row.
  A record is {"text"} (trained on everywhere), Alpaca {"instruction", "input", "output"},
  {"prompt", "completion"}, chat {"messages": [{"role": system | user | assistant, "content"}]}, or
  ShareGPT {"conversations": [{"from": system | human | gpt, "value"}]}.
- A mixture, `a.jsonl:0.7,b.json:0.3`: each source is split and held out on its own, and every
  epoch draws from the sources' training documents in proportion to their weights (`Mixture`).

Formats (`fmt`, train.py's --chat_format, by default detected from the tokenizer's special tokens):
- alpaca: instruction records in the Alpaca prompt (ALPACA_PROMPT below), prompt/completion
  verbatim, then eos.
- chatml (SmolLM2, Qwen) and llama3 (Llama 3 instruct headers), written out in CHAT_FORMATS: every
  conversational record becomes turns (an Alpaca record is one user and one assistant turn).
Only the answer is trained on: prompt and header tokens get label -100; the response and its
closing eos (or end-of-turn token) are targets. Text documents are trained on everywhere.

Two ways to make rows (`Batches`):
- packing (default): whole documents are placed first-fit into rows of `seq_len`; each token
  carries its position within its document (restarting at 0) and a document id, and the model
  masks attention so documents never see each other. Documents longer than a row are cut into
  row-sized pieces (text) or truncated (instruction data: a response without its prompt is noise);
  the log reports both, and packing efficiency = real tokens / slots. Measured: arith at 66 tokens
  100% (six 11-token sums a row); GSM8K (byte tokens, 300-1000 per record) 94% at 2048 but 87% at 1024, where few pairs of
  documents fit one row (sorting by length first does not help: 76-85%).
- padding: one document per row, rows of similar length grouped into a batch (sorted within a
  window of 64 batches) and right-padded to the longest, so a plain causal mask is exact.

Sharding: every rank computes the same deterministic list of batches for an epoch (seeded shuffle),
and rank r takes batches r, r + world, r + 2 world, ...; the remainder that would leave some rank
without a batch is dropped. The stream position (epoch, batch index) is saved in checkpoints.
"""

import difflib
import functools
import hashlib
import json
import math
import os
import random
import re
import warnings

import numpy as np
import torch

IGNORE = -100  # label of tokens that carry no loss

# -----------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255 plus bos/eos/pad; needs no files. Fits the `tiny` preset."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text, bos=False):
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8"))

    def encode_with_offsets(self, text, bos=False):
        """(ids, the (start, end) characters of text each id comes from)."""
        spans = [(k, k + 1) for k, ch in enumerate(text) for _ in ch.encode("utf-8")]
        return self.encode(text, bos), [(0, 0)] * bos + spans

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self):
        return "bytes-v1"


class HFTokenizer:
    """A Hugging Face tokenizer.json through the tokenizers library.

    bos is whatever the tokenizer's own post-processor adds (Llama adds <s>, ChatML models add
    nothing); eos comes from the model's config (passed in), since tokenizer.json does not say.
    """

    def __init__(self, path, eos_id=None, bos_id=None):
        from tokenizers import Tokenizer
        self.path = path
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise ValueError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:120]})") from None
        # one past the largest id, not the count: ids may leave gaps (added tokens placed past the rest)
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.eos_id, self.bos_id = eos_id, bos_id
        self.pad_id = eos_id if eos_id is not None else 0
        self.chat_template = read_chat_template(os.path.dirname(path))  # the checkpoint's own, or None
        self.eos_token = self.tok.id_to_token(eos_id) if eos_id is not None else ""

    def encode(self, text, bos=False):
        return self.tok.encode(text, add_special_tokens=bos).ids

    def encode_with_offsets(self, text, bos=False):
        encoding = self.tok.encode(text, add_special_tokens=bos)
        return encoding.ids, encoding.offsets

    def has_token(self, text):
        return self.tok.token_to_id(text) is not None

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def fingerprint(self):
        with open(self.path, "rb") as f:
            return hashlib.sha1(f.read() + (self.chat_template or "").encode()).hexdigest()[:16] + f"-eos{self.eos_id}"


def read_chat_template(folder):
    """An HF folder's chat template: chat_template.jinja, or tokenizer_config.json's chat_template."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        return read_text(path)
    config = os.path.join(folder, "tokenizer_config.json")
    template = json.loads(read_text(config)).get("chat_template") if os.path.isfile(config) else None
    return template if isinstance(template, str) else None


def load_tokenizer(model_dir=None, eos_id=None, bos_id=None):
    """tokenizer.json from an HF model folder, or the byte tokenizer when there is no folder."""
    if model_dir is None:
        return ByteTokenizer()
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; the model folder must ship a tokenizer.json")
    return HFTokenizer(path, eos_id=eos_id, bos_id=bos_id)


# -----------------------------------------------------------------------------
# Records -> segments of (text, trainable)

# The Stanford Alpaca prompt; the response follows "### Response:\n" and ends with eos.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction, input=""):
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


# Chat formats, written out. Each turn is a header (never trained on) and its content closed by the
# end-of-turn token (trained on in assistant turns only, so the model learns to stop). bos, where a
# model has one (Llama 3's <|begin_of_text|>), is added by the tokenizer, not written here. No
# system turn is invented: SmolLM2's template adds a default one, training data rarely wants it.
CHAT_FORMATS = {
    "chatml": ("<|im_start|>{role}\n", "{content}<|im_end|>\n"),  # SmolLM2, Qwen
    "llama3": ("<|start_header_id|>{role}<|end_header_id|>\n\n", "{content}<|eot_id|>"),  # Llama 3 instruct
}
ROLES = ("system", "user", "assistant")


def detect_format(tok):
    """The checkpoint's own chat template when it has one and jinja2 is installed; else the chat
    format its special tokens imply; alpaca when it has none of them."""
    if getattr(tok, "chat_template", None) and has_jinja2():
        return "template"
    has = getattr(tok, "has_token", lambda t: False)
    return "chatml" if has("<|im_start|>") else "llama3" if has("<|start_header_id|>") else "alpaca"


def format_template(fmt, bos=False, eos_token=""):
    """A built-in format as a Hugging Face chat template (Jinja), for the hf/ export: through
    transformers' apply_chat_template it gives the text (so the tokens) this module trains on. bos:
    the tokenizer adds a bos token, which a template writes as {{ bos_token }}. Alpaca's template
    writes a user turn as an instruction without input (as --ask does); the records it cannot
    express, with an input or prompt/completion verbatim, train text of their own."""
    lit = json.dumps  # a Jinja string literal
    start = "{{ bos_token }}" if bos else ""
    if fmt == "alpaca":  # one user turn (the instruction) and the answer closed by eos, as --ask writes it
        before, after = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
        return (start + "{% for message in messages %}"
                "{% if message['role'] == 'user' %}{{ " + lit(before) + " + message['content'] + " + lit(after) + " }}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + " + lit(eos_token) + " }}"
                "{% else %}{{ raise_exception('the Alpaca format has user and assistant turns only') }}{% endif %}"
                "{% endfor %}")
    header, body = CHAT_FORMATS[fmt]
    (h0, h1), (b0, b1) = header.split("{role}"), body.split("{content}")
    return (start + "{% for message in messages %}{{ " + lit(h0) + " + message['role'] + " + lit(h1 + b0)
            + " + message['content'] + " + lit(b1) + " }}{% endfor %}"
            "{% if add_generation_prompt %}{{ " + lit(h0 + "assistant" + h1) + " }}{% endif %}")


def has_jinja2():
    import importlib.util
    return importlib.util.find_spec("jinja2") is not None


@functools.lru_cache(maxsize=4)
def compiled_template(template):
    """An HF chat template compiled as transformers compiles it (sandboxed jinja2, trim_blocks,
    lstrip_blocks), once: compiling is 15x the cost of rendering."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_template(template, turns, add_generation_prompt, eos_token=""):
    """A conversation through the chat template. bos_token is empty: the tokenizer adds bos
    itself, as for the built-in formats."""
    return compiled_template(template).render(messages=[{"role": r, "content": c} for r, c in turns],
                                              add_generation_prompt=add_generation_prompt, bos_token="", eos_token=eos_token)


def template_segments(turns, template, eos_token=""):
    """Segments from the template, labels on the assistant turns only: the conversation is rendered
    prefix by prefix, and an assistant turn is what its full render adds to the render of the turns
    before it with the generation prompt (its header)."""
    segments, done = [], ""
    for k, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        head = render_template(template, turns[:k], True, eos_token)
        full = render_template(template, turns[:k + 1], False, eos_token)
        if not head.startswith(done) or not full.startswith(head):
            raise ValueError("--chat_format=template: this template does not render a conversation prefix by prefix "
                             "(each render extending the last); use --chat_format=chatml, llama3 or alpaca")
        segments += [(head[len(done):], False), (full[len(head):], True)]
        done = full
    return segments


def text_field(rec, key, where, optional=False):
    """rec[key] as a string; a null, number or list there is an error, never the text "None"."""
    value = rec.get(key)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {'null' if value is None else type(value).__name__}")
    return value


def chat_turns(rec, where):
    """A record as (role, content) turns: {"messages": [{"role", "content"}, ...]}, or an Alpaca /
    prompt-completion record as one user turn and one assistant turn."""
    if "messages" in rec or "conversations" in rec:
        turns = message_turns(rec["messages"] if "messages" in rec else rec["conversations"], where,
                              "messages" if "messages" in rec else "conversations")
        if not turns or turns[-1][0] != "assistant":
            raise ValueError(f"{where}: a chat record must end with an assistant message")
        return turns
    if "instruction" in rec and "output" in rec:
        extra = text_field(rec, "input", where, optional=True)
        user = text_field(rec, "instruction", where) + ("\n\n" + extra if extra else "")
        return [("user", user), ("assistant", text_field(rec, "output", where))]
    return [("user", text_field(rec, "prompt", where)), ("assistant", text_field(rec, "completion", where))]


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def message_turns(messages, where, key="messages"):
    """[(role, content)] of a message list: {"role", "content"} (OpenAI, TRL) or ShareGPT's
    {"from": system | human | gpt, "value"}."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: {key!r} must be a list of messages, got {type(messages).__name__}")
    turns = []
    for i, msg in enumerate(messages):
        sharegpt = isinstance(msg, dict) and "from" in msg and "value" in msg
        if not isinstance(msg, dict) or not (sharegpt or ("role" in msg and "content" in msg)):
            raise ValueError(f"{where}: {key}[{i}] must be an object with 'role' and 'content' (or ShareGPT's "
                             f"'from' and 'value')")
        if not isinstance(msg["from" if sharegpt else "role"], str):
            raise ValueError(f"{where}: {key}[{i}]: the role must be a string, got {msg['from' if sharegpt else 'role']!r}")
        role = SHAREGPT_ROLES.get(msg["from"]) if sharegpt else msg["role"]
        if role not in ROLES:
            raise ValueError(f"{where}: {key}[{i}] has unknown role {msg['from'] if sharegpt else msg['role']!r}; "
                             f"expected one of {', '.join(SHAREGPT_ROLES if sharegpt else ROLES)}")
        turns.append((role, text_field(msg, "value" if sharegpt else "content", f"{where}: {key}[{i}]")))
    return turns


def chat_segments(turns, fmt):
    header, body = CHAT_FORMATS[fmt]
    segments = []
    for role, content in turns:
        segments += [(header.format(role=role), False), (body.format(content=content), role == "assistant")]
    return segments


def chat_prompt(turns, fmt, tok=None):
    """The text a model continues to answer: the turns so far and an open assistant header."""
    if fmt == "template":
        return render_template(tok.chat_template, turns, True, tok.eos_token)
    return "".join(text for text, _ in chat_segments(turns, fmt)) + CHAT_FORMATS[fmt][0].format(role="assistant")


def record_segments(rec, where, fmt="alpaca", tok=None):
    """One record -> ([(text, trainable)], kind, reference answer or None, add_eos).

    fmt: alpaca (instruction data in the Alpaca prompt, prompt/completion verbatim; eos appended)
    or a chat format (every conversational record as turns; the end-of-turn tokens are in the text).
    `where` names the record in errors."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    layouts = [keys for keys in (("text",), ("instruction", "output"), ("prompt", "completion"), ("messages",),
                                 ("conversations",)) if set(keys) & set(rec)]
    if len(layouts) > 1:  # one would be trained on, the other silently left out
        raise ValueError(f"{where}: holds two record layouts ({' and '.join('/'.join(k) for k in layouts)}); keep one")
    if "text" in rec and not ({"instruction", "prompt", "messages", "conversations"} & set(rec)):
        return [(text_field(rec, "text", where), True)], "text", None, True
    if not ({"instruction", "output"} <= set(rec) or {"prompt", "completion"} <= set(rec)
            or {"messages", "conversations"} & set(rec)):
        raise ValueError(f"{where}: expected a 'text' field, Alpaca fields 'instruction' and 'output', "
                         f"'prompt' and 'completion', 'messages' or 'conversations', got keys {sorted(rec)}")
    if fmt in CHAT_FORMATS or fmt == "template":
        turns = chat_turns(rec, where)
        segments = template_segments(turns, tok.chat_template, tok.eos_token) if fmt == "template" else chat_segments(turns, fmt)
        return segments, "instruction", turns[-1][1], False
    if {"messages", "conversations"} & set(rec):
        raise ValueError(f"{where}: a chat record needs a chat format (--chat_format=chatml, llama3 or template)")
    if "instruction" in rec:
        prompt = alpaca_prompt(text_field(rec, "instruction", where), text_field(rec, "input", where, optional=True))
        output = text_field(rec, "output", where)
        return [(prompt, False), (output, True)], "instruction", output, True
    completion = text_field(rec, "completion", where)
    return [(text_field(rec, "prompt", where), False), (completion, True)], "instruction", completion, True


def arith_records(n=10000, seed=1234):
    """All sums a+b with a, b < 100, in a fixed shuffled order (so the held-out tail is unseen),
    written at fixed width ("07+45=" -> "052"): every digit keeps its place, which a small model
    learns several times faster than ragged numbers."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(pairs)
    return [{"prompt": f"{a:02d}+{b:02d}=", "completion": f"{a + b:03d}"} for a, b in pairs[:n]]


def read_text(path):
    """A file's text; bytes that are not UTF-8 are an error naming the line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None


# Every key a record layout names: text; Alpaca; prompt / completion; chat; preference pairs.
RECORD_KEYS = ("text", "instruction", "input", "output", "prompt", "completion", "messages", "conversations", "chosen",
               "rejected")


def checked_keys(records):
    """Pass (record, where) pairs on, refusing a key that looks like a misspelt layout key ('inputs':
    its text would silently be left out) and warning once per other unknown key (ignored metadata)."""
    warned = set()
    for rec, where in records:
        for key in rec if isinstance(rec, dict) else ():
            if key in RECORD_KEYS or key in warned:
                continue
            # prompt_id, conversation_id: metadata (no layout key has an underscore), not a misspelling
            close = difflib.get_close_matches(key, RECORD_KEYS, n=1, cutoff=0.8) if "_" not in key else []
            if close:
                raise ValueError(f"{where}: unknown key {key!r}; did you mean {close[0]!r}? (record keys: "
                                 f"{', '.join(RECORD_KEYS)})")
            warnings.warn(f"{where}: key {key!r} is in no record layout and is ignored (in this record and any other)")
            warned.add(key)
        yield rec, where


def read_records(path):
    """Yield (record, where) from a .json list, a .jsonl file or a .txt file (keys checked: checked_keys)."""
    return checked_keys(records_in(path))


def lines_of(path):
    """(line number, text) of a file, one line at a time (a 1 GB file is never held whole); bytes
    that are not UTF-8 are an error naming the line."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                yield i, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x})") from None


def records_in(path):
    if os.path.isdir(path):  # datasets' save_to_disk folder
        yield from arrow_records(path)
    elif path.endswith(".txt"):  # paragraphs (separated by blank lines) are documents: some can be held out
        paragraph, k = [], 0
        for _, line in [*lines_of(path), (0, "")]:  # a blank line at the end closes the last paragraph
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                k += 1
                yield {"text": "".join(paragraph).strip()}, f"{path}: paragraph {k}"
                paragraph = []
    elif path.endswith(".jsonl"):
        for i, line in lines_of(path):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield rec, f"{path}:{i}"
    elif path.endswith(".json"):  # a JSON list is parsed whole: large corpora belong in .jsonl or .parquet
        try:
            recs = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(recs, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(recs).__name__}")
        for i, rec in enumerate(recs):
            yield rec, f"{path}[{i}]"
    elif path.endswith(".parquet"):
        yield from parquet_records(path)
    else:
        raise ValueError(f"{path}: unknown data file type, expected .txt, .jsonl, .json, .parquet or a datasets "
                         f"folder (or 'arith')")


def parquet_records(path):
    """A .parquet file's rows as records, 1024 rows at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for rec in batch.to_pylist():
                yield rec, f"{path}: row {row}"
                row += 1
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        if "row " in str(e) and str(e).startswith(path):
            raise
        raise ValueError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:120]})") from None


def arrow_records(path):
    """The rows of a folder written by datasets.Dataset.save_to_disk, memory-mapped by datasets."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        raise ValueError(f"{path}: holds splits {', '.join(sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))))}"
                         f"; pass one split's folder")
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise ValueError(f"{path}: a folder, but not one written by datasets' save_to_disk (no state.json)")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: reading a datasets folder needs datasets (pip install datasets)") from None
    table = datasets.load_from_disk(path)
    for row, rec in enumerate(table):
        yield rec, f"{path}: row {row}"


def tokenize_segments(tok, segments, add_eos=True):
    """Segments -> (ids, mask) with bos at the start and (add_eos) a trainable eos at the end. The
    text is tokenized whole, as a chat template's render is at inference, so the tokens at each
    boundary are the ones a served model sees (piece by piece, "\n\n" + "What" could become one
    token where the whole text has two). A token is a target where any of its characters is in a
    trainable segment."""
    text = "".join(t for t, _ in segments)
    ids, spans = tok.encode_with_offsets(text, bos=True)
    flags = [trainable for t, trainable in segments for _ in t] or [False]
    in_target = np.concatenate([[0], np.cumsum(flags)])
    mask = []
    for s, e in spans:  # a token without characters (one the post-processor adds) goes with the token before it
        mask.append(bool(in_target[e] > in_target[s]) if e > s else (mask[-1] if mask else flags[0]))
    ids = list(ids)
    if add_eos and tok.eos_id is not None:
        ids.append(tok.eos_id)
        mask.append(True)  # the model must learn to stop
    return ids, mask


# -----------------------------------------------------------------------------
# Token storage: flat tokens + loss mask + document offsets


class TokenData:
    """tokens[offsets[d]:offsets[d+1]] is document d; mask[t] = 1 where token t is a training target."""

    def __init__(self, tokens, mask, offsets, kinds, references=None, prompts=None):
        self.tokens, self.mask, self.offsets = tokens, mask, np.asarray(offsets, dtype=np.int64)
        self.split_long = kinds == "text"  # text is cut into pieces, instruction data truncated
        self.references = references or []  # per document: reference answer (instruction data)
        self.prompts = prompts or []  # per document: prompt text, for accuracy eval by generation

    def __len__(self):
        return len(self.offsets) - 1

    def doc_lengths(self):
        return np.diff(self.offsets)


def tokenize_records(records, tok, fmt="alpaca"):
    """(record, where) pairs -> (ids, mask, kind, reference, prompt) per document. The prompt (for
    accuracy by generation) is the text before the last trained segment."""
    for rec, where in records:
        segments, kind, ref, add_eos = record_segments(rec, where, fmt, tok)
        ids, mask = tokenize_segments(tok, segments, add_eos)
        last = max(i for i, (_, trainable) in enumerate(segments) if trainable)
        prompt = "".join(text for text, _ in segments[:last]) if kind == "instruction" else None
        yield ids, mask, kind, ref, prompt


def in_memory(records, tok, fmt="alpaca"):
    t, m, offsets, kinds, refs, prompts = [], [], [0], set(), [], []
    for ids, mask, kind, ref, prompt in tokenize_records(records, tok, fmt):
        t += ids
        m += mask
        offsets.append(len(t))
        kinds.add(kind)
        refs.append(ref)
        prompts.append(prompt)
    if len(offsets) == 1:
        raise ValueError("data: no records found")
    return TokenData(np.array(t, np.int32), np.array(m, np.uint8), offsets, "text" if kinds == {"text"} else "instruction",
                     refs, prompts)


def load_documents(source, tok, cache_dir=None, fmt="alpaca"):
    """'arith' or a file -> TokenData. Files are tokenized once into `cache_dir` and memory-mapped.
    fmt: alpaca, chatml or llama3 (how instruction and chat records become text)."""
    if fmt not in ("alpaca", "template", *CHAT_FORMATS):
        raise ValueError(f"--chat_format={fmt} is not one of alpaca, template, {', '.join(CHAT_FORMATS)}")
    if fmt == "template" and not getattr(tok, "chat_template", None):
        raise ValueError("--chat_format=template: the tokenizer's folder has no chat_template.jinja and no chat_template "
                         "in tokenizer_config.json")
    if source == "arith":
        return in_memory(((r, "arith") for r in arith_records()), tok, fmt)
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: data file not found (or use --data=arith)")
    if cache_dir is None:
        return in_memory(read_records(source), tok, fmt)
    folder = token_cache_path(source, tok, cache_dir, fmt)
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        write_token_cache(source, tok, folder, fmt)
    return open_token_cache(folder)


def source_files(source):
    """The files of a data source: the file itself, or those of a datasets folder (none for 'arith')."""
    files = [os.path.join(source, f) for f in sorted(os.listdir(source))] if os.path.isdir(source) else [source]
    return [f for f in files if os.path.isfile(f)]


def token_cache_path(source, tok, cache_dir, fmt="alpaca"):
    stats = [os.stat(f) for f in source_files(source)]
    key = (f"{os.path.abspath(source)}|{sum(s.st_size for s in stats)}|{max(s.st_mtime_ns for s in stats)}|{tok.fingerprint()}|{ALPACA_PROMPT}|{fmt}|"
           f"{CHAT_FORMATS.get(fmt)}|whole-text")  # whole-text: tokenize_segments' rule since caches made before it
    name = os.path.basename(source) + "-" + hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, name)


def write_token_cache(source, tok, folder, fmt="alpaca", flush_every=1 << 20):
    """Stream records into tokens.bin (int32) / mask.bin (uint8), flushing every ~1M tokens."""
    tmp = folder + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    offsets, kinds, refs, prompts, buf_t, buf_m = [0], set(), [], [], [], []
    with open(os.path.join(tmp, "tokens.bin"), "wb") as ft, open(os.path.join(tmp, "mask.bin"), "wb") as fm:
        for ids, m, kind, ref, prompt in tokenize_records(read_records(source), tok, fmt):
            buf_t += ids
            buf_m += m
            offsets.append(offsets[-1] + len(ids))
            kinds.add(kind)
            refs.append(ref)
            prompts.append(prompt)
            if len(buf_t) >= flush_every:
                ft.write(np.array(buf_t, np.int32).tobytes())
                fm.write(np.array(buf_m, np.uint8).tobytes())
                buf_t, buf_m = [], []
        ft.write(np.array(buf_t, np.int32).tobytes())
        fm.write(np.array(buf_m, np.uint8).tobytes())
    if len(offsets) == 1:
        raise ValueError(f"{source}: no records found")
    np.save(os.path.join(tmp, "offsets.npy"), np.array(offsets, np.int64))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"source": source, "kind": "text" if kinds == {"text"} else "instruction",
                   "references": refs, "prompts": prompts}, f)
    os.replace(tmp, folder)


def open_token_cache(folder):
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    tokens = np.memmap(os.path.join(folder, "tokens.bin"), dtype=np.int32, mode="r")
    mask = np.memmap(os.path.join(folder, "mask.bin"), dtype=np.uint8, mode="r")
    return TokenData(tokens, mask, np.load(os.path.join(folder, "offsets.npy")), meta["kind"],
                     meta["references"], meta["prompts"])


def split_documents(n_docs, eval_frac):
    """The last `eval_frac` of documents is held out (at least 1 when eval_frac > 0)."""
    n_eval = min(n_docs - 1, max(1, round(n_docs * eval_frac))) if eval_frac > 0 else 0
    return range(0, n_docs - n_eval), range(n_docs - n_eval, n_docs)


# -----------------------------------------------------------------------------
# Mixtures of sources: --data=a.jsonl:0.7,b.json:0.3


def parse_mixture(spec):
    """'a.jsonl:0.7,b.json:0.3' -> [(source, weight)]; a source without a weight weighs 1."""
    if os.path.exists(spec):  # one file whose name has a comma or a colon in it
        return [(spec, 1.0)]
    sources = []
    for part in spec.split(","):
        path, sep, weight = part.rpartition(":")
        if not sep or os.path.exists(part):  # no weight (or a path with a colon in its name)
            path, weight = part, "1"
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not (0 < value < math.inf):
            raise ValueError(f"--data: the weight of {path} is {weight!r}, expected a positive number "
                             f"(--data=a.jsonl:0.7,b.json:0.3)")
        if any(path == p for p, _ in sources):
            raise ValueError(f"--data: {path} is listed twice; give it one weight")
        sources.append((path, value))
    return sources


class Joined:
    """Several sources' token (or mask) arrays as one, without copying: slices never cross a
    document, so each falls within one source (its memory-mapped array)."""

    def __init__(self, arrays):
        self.arrays, self.starts = arrays, np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, s):
        # the source holding s.start (the last one for an empty slice at the very end)
        k = min(int(np.searchsorted(self.starts, s.start, side="right")) - 1, len(self.arrays) - 1)
        return self.arrays[k][s.start - self.starts[k]:s.stop - self.starts[k]]


def joined(parts):
    """TokenData of several sources, documents numbered on from one source to the next."""
    starts = np.cumsum([0] + [len(p.tokens) for p in parts])
    offsets = np.concatenate([p.offsets[:-1] + s for p, s in zip(parts, starts)] + [starts[-1:]])
    return TokenData(Joined([p.tokens for p in parts]), Joined([p.mask for p in parts]), offsets,
                     "text" if all(p.split_long for p in parts) else "instruction",
                     [r for p in parts for r in (p.references or [None] * len(p))],
                     [q for p in parts for q in (p.prompts or [None] * len(p))])


class Mixture:
    """Each epoch as many documents as the sources' training documents together, drawn from each
    source in proportion to its weight: its documents shuffled anew each time it runs out, so a
    small source with a large weight repeats and a large one with a small weight is sampled.
    Deterministic for (seed, epoch), so a resumed stream continues exactly."""

    def __init__(self, train_docs, weights):
        self.train_docs, self.weights = [list(d) for d in train_docs], weights

    def counts(self):
        """Documents per source in an epoch: n * weight share, rounded so that they add up to n."""
        n, total = sum(len(d) for d in self.train_docs), sum(self.weights)
        exact = [n * w / total for w in self.weights]
        counts = [int(x) for x in exact]
        for k in sorted(range(len(exact)), key=lambda k: counts[k] - exact[k])[:n - sum(counts)]:
            counts[k] += 1  # the largest remainders
        return counts

    def epoch_docs(self, epoch, seed):
        order = []
        for s, (docs, n) in enumerate(zip(self.train_docs, self.counts())):
            rng, picked = random.Random((seed * 1_000_003 + epoch) * 1_009 + s), []
            while len(picked) < n:
                cycle = list(docs)
                rng.shuffle(cycle)
                picked += cycle
            order += picked[:n]
        return order


def load_mixture(sources, tok, cache, fmt, eval_frac):
    """(dataset, the Mixture of the sources' training documents, held-out documents, per-source
    (path, documents, held out, weight)); each source is split on its own."""
    parts = [load_documents(path, tok, cache, fmt) for path, _ in sources]
    first = np.cumsum([0] + [len(p) for p in parts])
    train, held, info = [], [], []
    for (path, weight), part, start in zip(sources, parts, first):
        t, e = split_documents(len(part), eval_frac)
        train.append([start + d for d in t])
        held += [start + d for d in e]
        info.append((path, len(part), len(e), weight))
    return joined(parts), Mixture(train, [w for _, w in sources]), held, info


# -----------------------------------------------------------------------------
# Rows and batches


def pieces_of(data: TokenData, docs, seq_len):
    """Documents -> (start, length) pieces no longer than seq_len; counts what was cut off."""
    pieces, cropped = [], 0
    lengths = data.doc_lengths()
    for d in docs:
        start, n = int(data.offsets[d]), int(lengths[d])
        if n <= seq_len:
            pieces.append((start, n))
        elif data.split_long:
            pieces += [(start + i, min(seq_len, n - i)) for i in range(0, n, seq_len)]
        else:
            pieces.append((start, seq_len))
            cropped += n - seq_len
    return pieces, cropped


def pack_first_fit(pieces, seq_len, open_rows=64):
    """Place each piece into the first of the last `open_rows` rows it fits; rows are piece lists.

    Looking back over 64 open rows instead of only the last one (next-fit) fills the holes that
    short documents leave, at O(64) work per document.
    """
    rows, room = [], []  # room[i] = free slots of rows[first_open + i]
    first_open = 0
    for p in pieces:
        for i, r in enumerate(room):
            if p[1] <= r:
                rows[first_open + i].append(p)
                room[i] -= p[1]
                break
        else:
            rows.append([p])
            room.append(seq_len - p[1])
            if len(room) > open_rows:
                room.pop(0)
                first_open += 1
    return rows


def collate(data: TokenData, rows, width, pad_id, packed):
    """Row piece lists -> tensors (B, width). Labels are next tokens within a piece, -100 elsewhere.

    num_tokens (real tokens, not padding) is for throughput logs; pop it before calling the model.
    """
    B = len(rows)
    ids = np.full((B, width), pad_id, np.int64)
    labels = np.full((B, width), IGNORE, np.int64)
    pos = np.zeros((B, width), np.int64)
    doc = np.full((B, width), -1, np.int64)
    for b, row in enumerate(rows):
        col = 0
        for j, (start, n, *_) in enumerate(row):  # PairBatches' pieces carry a third field, their answer's slot
            if n == 0:  # an empty document (no bos, no eos, no text) has nothing to place
                continue
            toks = np.asarray(data.tokens[start:start + n], np.int64)
            ids[b, col:col + n] = toks
            targets = np.where(np.asarray(data.mask[start + 1:start + n], bool), toks[1:], IGNORE)
            labels[b, col:col + n - 1] = targets
            pos[b, col:col + n] = np.arange(n)
            doc[b, col:col + n] = j
            col += n
    batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
             "position_ids": torch.from_numpy(pos), "num_tokens": int(sum(p[1] for row in rows for p in row))}
    # One right-padded document per row needs no document mask: causal attention never sees the padding.
    batch["doc_ids"] = torch.from_numpy(doc) if packed else None
    return batch


class Batches:
    """An endless, resumable, sharded stream of batches over a set of documents.

    batch_size rows of seq_len tokens (packing) or batch_size documents (padding) per batch.
    """

    def __init__(self, data: TokenData, docs, seq_len, batch_size, pad_id, *, rank=0, world=1, seed=0,
                 pack=True, shuffle=True, mixture=None):
        self.data, self.docs, self.seq_len, self.batch_size, self.pad_id = data, list(docs), seq_len, batch_size, pad_id
        self.mixture = mixture  # a Mixture: each epoch's documents are drawn from its sources by weight
        self.rank, self.world, self.seed, self.pack, self.shuffle = rank, world, seed, pack, shuffle
        self.epoch, self.index = 0, 0  # the stream position
        self._plan_epoch = None
        self.stats = {}

    unit, hint = "rows", "--batch_size or --seq_len"  # for the error when ranks outnumber batches

    def plan(self, epoch):
        """This rank's batches for `epoch`: lists of rows, each a list of (start, length) pieces."""
        if self._plan_epoch == epoch:
            return self._plan
        order = self.mixture.epoch_docs(epoch, self.seed) if self.mixture else list(self.docs)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        batches, pieces, cropped = self.make_batches(order, epoch)
        real = sum(p[1] for p in pieces)
        slots = sum(len(b) * (self.seq_len if self.pack else max(r[0][1] for r in b)) for b in batches)
        per_rank = len(batches) // self.world
        if per_rank == 0:
            raise ValueError(f"data: {len(batches)} batches of {self.batch_size} {self.unit} cannot give each of "
                             f"{self.world} ranks one; use less {self.hint}, or more data")
        untrainable = sum(1 for start, n in pieces if not self.data.mask[start:start + n].any())  # prompt fills the row
        self.stats = {"docs": len(order), "tokens": real, "cropped_tokens": cropped, "untrainable": untrainable,
                      "efficiency": real / max(slots, 1), "batches_per_rank": per_rank}
        self._plan = batches[self.rank:per_rank * self.world:self.world]
        self._plan_epoch = epoch
        return self._plan

    def make_batches(self, order, epoch):
        """(batches, pieces, cropped tokens) of the documents in `order`, for every rank."""
        pieces, cropped = pieces_of(self.data, order, self.seq_len)
        if self.pack:
            rows = pack_first_fit(pieces, self.seq_len)
            return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)], pieces, cropped
        # Sort by length within windows of 64 batches: similar lengths share a batch, order stays random.
        window = 64 * self.batch_size
        batches = []
        for w in range(0, len(pieces), window):
            chunk = sorted(pieces[w:w + window], key=lambda p: p[1])
            batches += [[[p] for p in chunk[i:i + self.batch_size]] for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch + 1).shuffle(batches)
        return batches, pieces, cropped

    def __iter__(self):
        return self

    def __next__(self):
        plan = self.plan(self.epoch)
        if self.index >= len(plan):
            self.epoch, self.index = self.epoch + 1, 0
            plan = self.plan(self.epoch)
        rows = plan[self.index]
        self.index += 1
        width = self.seq_len if self.pack else max(r[0][1] for r in rows)
        return collate(self.data, rows, width, self.pad_id, self.pack)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]


# -----------------------------------------------------------------------------
# Preference pairs (DPO): document 2i is pair i's chosen answer, 2i + 1 its rejected one


def pair_records(records):
    """Preference pairs -> two ordinary records per pair, chosen first, tokenized like SFT data: the
    prompt rendered in the chat format in use and masked, the answer trained on. A pair is
    {"prompt", "chosen", "rejected"} as strings; {"messages", "chosen", "rejected"} (the conversation
    before a string answer); or TRL's conversational layout, where chosen and rejected are message
    lists, after a "prompt" message list or, without one, after their common prefix."""
    same = []
    for rec, where in records:
        if not isinstance(rec, dict) or not {"chosen", "rejected"} <= set(rec):
            raise ValueError(f"{where}: a preference record needs 'chosen' and 'rejected' (and 'prompt' or 'messages' "
                             f"unless they are message lists), got {sorted(rec) if isinstance(rec, dict) else type(rec).__name__}")
        if isinstance(rec["chosen"], list) or isinstance(rec["rejected"], list):
            prompt, answers = conversational_pair(rec, where)
        else:
            if not {"prompt", "messages"} & set(rec):
                raise ValueError(f"{where}: a preference record with string answers needs 'prompt' or 'messages'")
            answers = [text_field(rec, key, where) for key in ("chosen", "rejected")]
            prompt = message_turns(rec["messages"], where) if "messages" in rec else text_field(rec, "prompt", where)
        if answers[0] == answers[1]:
            same.append(where)
        for key, answer in zip(("chosen", "rejected"), answers):
            if isinstance(prompt, str):
                yield {"prompt": prompt, "completion": answer}, f"{where} ({key})"
            else:
                tail = answer if isinstance(answer, list) else [("assistant", answer)]
                yield {"messages": [{"role": r, "content": c} for r, c in prompt + tail]}, f"{where} ({key})"
    if same:  # their loss is log 2 whatever the model does: no gradient, nothing learnt
        warnings.warn(f"{same[0]}: chosen and rejected are the same text in {len(same)} pair(s) (first named); they "
                      f"train nothing (loss log 2, no gradient)")


def conversational_pair(rec, where):
    """TRL's layout: (prompt turns, [chosen turns, rejected turns]) with each answer ending in an
    assistant turn; the prompt is rec["prompt"] (a message list) or the answers' common prefix."""
    chosen, rejected = (message_turns(rec[k], where, k) for k in ("chosen", "rejected"))
    if "prompt" in rec:
        prompt = message_turns(rec["prompt"], where, "prompt")
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1][0] != "assistant":
            raise ValueError(f"{where}: {key!r} must end with an assistant message (after the prompt)")
    return prompt, [chosen, rejected]


class PairBatches(Batches):
    """Batches of `batch_size` pairs over pair indices. pack=True: the batch's 2 x batch_size
    documents (each cropped to seq_len) packed first-fit into rows of seq_len, with document masks,
    so a pair's chosen and rejected answers go through in one batch and short pairs share rows;
    pack=False: one right-padded document per row, chosen_0, rejected_0, chosen_1, ... Each batch
    adds seq_ids ([rows, width]: the document each token belongs to, 2k for pair k's chosen answer,
    2k + 1 for its rejected one, -1 for padding) and num_pairs. A crop that leaves an answer no token
    gives that pair a zero log-ratio. Sharded and resumable as Batches."""

    unit, hint = "pairs", "--batch_size"

    def make_batches(self, order, epoch):
        pieces, cropped = pieces_of(self.data, [d for p in order for d in (2 * p, 2 * p + 1)], self.seq_len)
        n = 2 * self.batch_size  # pieces per batch: one per document, as instruction documents are cropped, not split
        # Each piece carries its answer's slot in the batch: 2k for pair k's chosen one, 2k + 1 its rejected one.
        groups = [[(*p, j) for j, p in enumerate(pieces[i:i + n])] for i in range(0, len(pieces), n)]
        batches = [pack_first_fit(g, self.seq_len, open_rows=n) if self.pack else [[p] for p in g] for g in groups]
        return batches, pieces, cropped

    def __next__(self):
        batch = super().__next__()
        rows = self.plan(self.epoch)[self.index - 1]  # the rows super() just collated
        seq_ids = torch.full(batch["input_ids"].shape, -1, dtype=torch.int64)
        for b, row in enumerate(rows):
            col = 0
            for _, n, slot in row:
                seq_ids[b, col:col + n] = slot
                col += n
        batch["seq_ids"], batch["num_pairs"] = seq_ids, sum(len(row) for row in rows) // 2
        return batch


# -----------------------------------------------------------------------------
# What train.py loads


def chat_format(cfg, tok, log=lambda *a: None):
    """The format to render records in: --chat_format, or for auto the checkpoint's template (with
    jinja2), else the built-in format its special tokens name."""
    if cfg.chat_format == "template" and not has_jinja2():
        raise ValueError("flag --chat_format=template renders the checkpoint's template with jinja2, which is not "
                         "installed (pip install jinja2)")
    if cfg.chat_format == "auto" and getattr(tok, "chat_template", None) and not has_jinja2():
        log("note: the checkpoint has a chat template, but jinja2 is not installed: using the built-in format")
    return detect_format(tok) if cfg.chat_format == "auto" else cfg.chat_format


def log_mixture(info, order, dataset, log):
    """A line per source: its documents, held out, weight, and share of an epoch's documents and tokens."""
    lengths, first = dataset.doc_lengths(), np.cumsum([0] + [n for _, n, _, _ in info])
    tokens = sum(int(lengths[d]) for d in order)
    for k, (path, n, held, weight) in enumerate(info):
        mine = [d for d in order if first[k] <= d < first[k + 1]]
        log(f"  source {path}: {n} docs ({held} held out), weight {weight:g}: {len(mine) / len(order):.1%} of an epoch's "
            f"documents, {sum(int(lengths[d]) for d in mine) / max(tokens, 1):.1%} of its tokens")


def load_for_training(cfg, tok, rank, world, log, barrier, *, fmt, local_rank=0):
    """train.py's data, from its Config, in chat format `fmt` (chat_format): (dataset, held-out
    documents, this rank's training batches). DPO: documents 2i and 2i + 1 are pair i's chosen and
    rejected answers, and pairs are held out whole.
    The token cache is built once: rank 0 tokenizes first; then the first process of each other
    node, which finds it there if the nodes share the cache folder and builds its own if not; then
    the rest open it (barrier(): every rank waits there)."""
    cache = cfg.data_cache or os.path.join(cfg.out_dir, "token_cache")

    def load():
        if cfg.objective == "dpo":
            return in_memory(pair_records(read_records(cfg.data)), tok, fmt), None, None, None
        sources = parse_mixture(cfg.data)
        if len(sources) > 1:
            return load_mixture(sources, tok, cache, fmt, cfg.eval_frac)
        return load_documents(sources[0][0], tok, cache, fmt), None, None, None

    loaded = load() if rank == 0 else None
    if world > 1:
        barrier()  # rank 0's cache is written
        loaded = load() if rank != 0 and local_rank == 0 else loaded
        barrier()  # every node's is
        loaded = load() if local_rank != 0 else loaded
    dataset, mixture, eval_docs, info = loaded
    if cfg.objective == "dpo":
        train_pairs, eval_pairs = split_documents(len(dataset) // 2, cfg.eval_frac)
        loader = PairBatches(dataset, train_pairs, cfg.seq_len, cfg.batch_size, tok.pad_id, rank=rank, world=world,
                             seed=cfg.seed, pack=cfg.pack)
        eval_docs = [2 * p for p in eval_pairs]
    else:
        train_docs, eval_docs = split_documents(len(dataset), cfg.eval_frac) if mixture is None else ([], eval_docs)
        loader = Batches(dataset, train_docs, cfg.seq_len, cfg.batch_size, tok.pad_id, rank=rank, world=world, seed=cfg.seed,
                         pack=cfg.pack, mixture=mixture)
    loader.plan(0)
    if mixture is not None:
        log_mixture(info, mixture.epoch_docs(0, cfg.seed), dataset, log)
    s = loader.stats
    log(f"data {cfg.data} ({fmt}): {s['docs']} train docs, {len(eval_docs)} held out, {s['tokens']:,} tokens/epoch, "
        f"{'packing' if cfg.pack else 'padding'} efficiency {s['efficiency']:.1%}, "
        f"{s['cropped_tokens']:,} tokens cropped, {s['batches_per_rank']} batches/rank/epoch"
        + (f"; {s['untrainable']:,} documents with no trainable token within --seq_len" if s["untrainable"] else ""))
    return dataset, eval_docs, loader


# -----------------------------------------------------------------------------
# Accuracy by generation


def score_answer(generated, reference, metric="exact"):
    """exact: strings equal after strip. last_number: the last number in each agrees (GSM8K)."""
    if metric == "exact":
        return generated.strip() == reference.strip()
    nums = lambda s: re.findall(r"-?\d[\d,]*\.?\d*", s)
    g, r = nums(generated), nums(reference)
    clean = lambda s: s.replace(",", "").rstrip(".")
    return bool(g and r) and clean(g[-1]) == clean(r[-1])


def to_device(batch, device):
    """A batch's tensors on the device (copied asynchronously from pinned memory where they are)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
