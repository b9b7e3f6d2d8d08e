import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, small_model

import data as D

RECORDS = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
           {"instruction": "Say hi.", "input": "", "output": "hi there"},
           {"text": "plain text is trained on everywhere"}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_alpaca_prompt_tokens_are_masked(tmp_path):
    tok = D.ByteTokenizer()
    data = D.load_documents(write_jsonl(tmp_path / "d.jsonl", RECORDS), tok)
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers."
              "\n\n### Input:\n2 and 3\n\n### Response:\n")
    want = [tok.bos_id] + list(prompt.encode()) + list(b"5") + [tok.eos_id]
    doc0 = data.tokens[data.offsets[0]:data.offsets[1]]
    assert doc0.tolist() == want
    assert data.mask[data.offsets[0]:data.offsets[1]].tolist() == [0] * (1 + len(prompt)) + [1, 1]
    doc1 = slice(data.offsets[1], data.offsets[2])
    assert tok.decode(data.tokens[doc1]).endswith("### Instruction:\nSay hi.\n\n### Response:\nhi there")
    assert "### Input" not in tok.decode(data.tokens[doc1])
    assert data.mask[data.offsets[2]:data.offsets[3]].all()  # the text record
    # in a batch: labels are the next token exactly where that token is a target
    batch = D.collate(data, [[(int(data.offsets[0]), len(want))]], len(want), tok.pad_id, packed=False)
    labels = batch["labels"][0].tolist()
    assert labels == [-100] * len(prompt) + [ord("5"), tok.eos_id, -100]


def test_hf_tokenizer_masks_the_prompt(smollm2_dir, tmp_path):
    tok = D.load_tokenizer(smollm2_dir, eos_id=2)
    data = D.load_documents(write_jsonl(tmp_path / "d.jsonl", RECORDS[:1]), tok)
    ids, mask = data.tokens[:data.offsets[1]].tolist(), data.mask[:data.offsets[1]].tolist()
    n_prompt = mask.index(1)
    assert tok.decode(ids[:n_prompt]) == D.alpaca_prompt("Add the numbers.", "2 and 3")
    assert ids[n_prompt:] == tok.encode("5") + [2]


def test_packed_batch_gives_each_document_the_loss_it_has_alone(tmp_path):
    tok = D.ByteTokenizer()
    recs = [{"prompt": f"{i}*{i}=", "completion": str(i * i) * (i % 4 + 1)} for i in range(12)]
    data = D.load_documents(write_jsonl(tmp_path / "d.jsonl", recs), tok)
    torch.manual_seed(0)
    m = small_model(vocab_size=260)
    loader = D.Batches(data, range(len(data)), 48, 4, tok.pad_id, shuffle=False)
    batch = next(loader)
    batch.pop("num_tokens")
    logits = m(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
    packed = F.cross_entropy(logits.reshape(-1, 260), batch["labels"].reshape(-1), reduction="none").view(-1, 48)
    seen = 0
    for b, row in enumerate(loader.plan(0)[0]):
        col = 0
        for start, n in row:
            one = D.collate(data, [[(start, n)]], n, tok.pad_id, packed=False)
            alone = F.cross_entropy(m(one["input_ids"])[0], one["labels"][0], reduction="none")
            assert_close(packed[b, col:col + n], alone)
            col, seen = col + n, seen + 1
    assert seen > 4  # several documents per row were really packed


def test_padded_batches_group_lengths_and_lose_nothing(tmp_path):
    tok = D.ByteTokenizer()
    recs = [{"text": "x" * n} for n in np.random.default_rng(0).integers(1, 60, 200)]
    data = D.load_documents(write_jsonl(tmp_path / "d.jsonl", recs), tok)
    loader = D.Batches(data, range(len(data)), 64, 8, tok.pad_id, pack=False, seed=3)
    plan = loader.plan(0)
    assert sorted(r[0] for b in plan for r in b) == sorted((int(data.offsets[i]), int(data.doc_lengths()[i]))
                                                          for i in range(200))
    assert loader.stats["efficiency"] > 0.9  # length grouping keeps padding small
    batch = next(loader)
    assert batch["doc_ids"] is None and batch["input_ids"].shape[1] == max(r[0][1] for r in plan[0])


def test_packing_is_efficient_and_crops_only_instruction_data(tmp_path):
    tok = D.ByteTokenizer()
    long_text = D.load_documents(write_jsonl(tmp_path / "t.jsonl", [{"text": "y" * 300}]), tok)
    pieces, cropped = D.pieces_of(long_text, [0], 128)
    assert [n for _, n in pieces] == [128, 128, 46] and cropped == 0
    long_inst = D.load_documents(write_jsonl(tmp_path / "i.jsonl", [{"prompt": "p", "completion": "z" * 300}]), tok)
    pieces, cropped = D.pieces_of(long_inst, [0], 128)
    assert [n for _, n in pieces] == [128] and cropped == 303 - 128
    data = D.load_documents("arith", tok)
    loader = D.Batches(data, range(len(data)), 66, 8, tok.pad_id)  # six 11-token sums per row
    loader.plan(0)
    assert loader.stats["efficiency"] > 0.95


def test_ranks_get_disjoint_deterministic_shards():
    tok = D.ByteTokenizer()
    data = D.load_documents("arith", tok)
    plans = [D.Batches(data, range(2000), 64, 4, tok.pad_id, rank=r, world=3, seed=7).plan(0) for r in range(3)]
    starts = [{p[0] for b in plan for row in b for p in row} for plan in plans]
    assert len(plans[0]) == len(plans[1]) == len(plans[2])
    assert not (starts[0] & starts[1] or starts[0] & starts[2] or starts[1] & starts[2])
    again = D.Batches(data, range(2000), 64, 4, tok.pad_id, rank=1, world=3, seed=7).plan(0)
    assert again == plans[1]
    other_epoch = D.Batches(data, range(2000), 64, 4, tok.pad_id, rank=1, world=3, seed=7).plan(1)
    assert other_epoch != plans[1]


def test_stream_resumes_at_saved_position():
    tok = D.ByteTokenizer()
    data = D.load_documents("arith", tok)
    a = D.Batches(data, range(300), 64, 4, tok.pad_id)
    seq = [next(a)["input_ids"] for _ in range(20)]  # crosses an epoch boundary
    b = D.Batches(data, range(300), 64, 4, tok.pad_id)
    for _ in range(7):
        next(b)
    c = D.Batches(data, range(300), 64, 4, tok.pad_id)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(next(c)["input_ids"], want) for want in seq[7:])


def test_token_cache_is_memory_mapped_and_equals_in_memory(tmp_path):
    tok = D.ByteTokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS * 50)
    mem = D.load_documents(path, tok)
    cached = D.load_documents(path, tok, cache_dir=str(tmp_path / "cache"))
    assert isinstance(cached.tokens, np.memmap)
    assert np.array_equal(mem.tokens, cached.tokens) and np.array_equal(mem.mask, cached.mask)
    assert np.array_equal(mem.offsets, cached.offsets) and mem.references == cached.references
    assert len(os.listdir(tmp_path / "cache")) == 1
    D.load_documents(path, tok, cache_dir=str(tmp_path / "cache"))  # second time: reused, not rebuilt
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_plain_text_file_is_one_document_per_paragraph(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n\n  \nsecond paragraph\n\n\n")
    data = D.load_documents(str(tmp_path / "a.txt"), D.ByteTokenizer())
    assert len(data) == 2 and D.ByteTokenizer().decode(data.tokens) == "line one\nline twosecond paragraph"


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        D.load_documents(str(path), D.ByteTokenizer())
    path.write_text('{"txt": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: unknown key 'txt'; did you mean 'text'\?"):
        D.load_documents(str(path), D.ByteTokenizer())
    path.write_text('{"body": "no layout"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a 'text' field"), pytest.warns(UserWarning, match="'body'"):
        D.load_documents(str(path), D.ByteTokenizer())


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json: not found"):
        D.load_tokenizer(str(tmp_path))


def test_score_answer_exact_and_last_number():
    assert D.score_answer(" 82", "82") and not D.score_answer("82 ", "28")
    ref = "She has 3 + 4 = 7 apples.\n#### 1,200"
    assert D.score_answer("so the answer is 1200.", ref, "last_number")
    assert not D.score_answer("so 1200 was wrong, it is 12", ref, "last_number")


def test_real_gsm8k_file_loads_and_packs(tmp_path, gsm8k_path):
    tok = D.ByteTokenizer()
    data = D.load_documents(gsm8k_path, tok, cache_dir=str(tmp_path))
    assert len(data) == 7473 and data.references[0].startswith("Natalia sold")
    loader = D.Batches(data, range(len(data)), 1024, 4, tok.pad_id)
    loader.plan(0)
    pieces, _ = D.pieces_of(data, range(len(data)), 1024)
    next_fit_rows = len(D.pack_first_fit(pieces, 1024, open_rows=1))
    assert loader.stats["efficiency"] > max(0.85, sum(n for _, n in pieces) / (next_fit_rows * 1024))


def test_chatml_two_turns_format_and_mask_as_written_out(smollm2_dir, tmp_path):
    tok = D.load_tokenizer(smollm2_dir, eos_id=2)
    tok.chat_template = None  # the built-in format, as detected from the special tokens alone
    assert D.detect_format(tok) == "chatml" and D.detect_format(D.ByteTokenizer()) == "alpaca"
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                        {"role": "assistant", "content": "6"}]}
    written = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
               "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
               "<|im_start|>assistant\n6<|im_end|>\n")
    data = D.load_documents(write_jsonl(tmp_path / "c.jsonl", [rec]), tok, fmt="chatml")
    ids, mask = data.tokens.tolist(), data.mask.tolist()
    assert ids == tok.tok.encode(written, add_special_tokens=False).ids  # the same tokens as the whole string
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("4<|im_end|>\n6<|im_end|>\n")  # both answers with their end of turn, nothing else
    assert data.prompts[0] == written[:written.rindex("6<|im_end|>")]  # generation prompt: up to the last answer
    assert data.references[0] == "6"


def test_llama3_format_is_the_header_layout():
    turns = [("user", "Hi"), ("assistant", "Hello")]
    text = "".join(t for t, _ in D.chat_segments(turns, "llama3"))
    assert text == ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>")
    assert D.chat_prompt(turns[:1], "llama3").endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_unknown_chat_role_names_the_record(tmp_path):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    with pytest.raises(ValueError, match=r"c.jsonl:1: messages\[1\] has unknown role 'bot'; expected one of "
                                         r"system, user, assistant"):
        D.load_documents(write_jsonl(tmp_path / "c.jsonl", [rec]), D.ByteTokenizer(), fmt="chatml")


def test_smollm2_chat_template_gives_the_tokens_and_labels_of_built_in_chatml(smollm2_dir):
    pytest.importorskip("jinja2")
    tok = D.load_tokenizer(smollm2_dir, eos_id=2)
    assert tok.chat_template and D.detect_format(tok) == "template"
    conversations = [  # with a system turn: SmolLM2's template would otherwise add its default one
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "system", "content": "You count."}, {"role": "user", "content": "One?"},
                      {"role": "assistant", "content": "1"}, {"role": "user", "content": "Then?"},
                      {"role": "assistant", "content": "2, then 3."}]},
        {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "Name a colour.\n\nAny."},
                      {"role": "assistant", "content": "Blue."}]},
    ]
    records = [(c, f"conversation {i}") for i, c in enumerate(conversations)]
    for (ids_t, mask_t, *_), (ids_c, mask_c, *_) in zip(D.tokenize_records(records, tok, "template"),
                                                        D.tokenize_records(records, tok, "chatml")):
        assert ids_t == ids_c and mask_t == mask_c
    # without a system turn the template adds SmolLM2's default one, and only the answer is trained on
    ids, mask, *_ = next(D.tokenize_records([({"prompt": "Hi", "completion": "Hello!"}, "r")], tok, "template"))
    text = tok.decode(ids)
    assert "You are a helpful AI assistant named SmolLM" in tok.tok.decode(ids, skip_special_tokens=False)
    assert tok.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "Hello!<|im_end|>\n"
    assert text.endswith("Hello!\n")
    assert D.chat_prompt([("user", "Hi")], "template", tok).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_an_empty_document_takes_no_slot_packed_padded_or_paired():
    # documents [1 2 3], [], [4 5], [6 7 8]: with no bos, eos or text a record tokenizes to nothing
    data = D.TokenData(np.array([1, 2, 3, 4, 5, 6, 7, 8], np.int32), np.ones(8, np.uint8), [0, 3, 3, 5, 8], "instruction")
    for pack in (True, False):
        batch = next(D.Batches(data, range(4), 8, 4, 0, pack=pack, shuffle=False))
        rows = [r[r != 0].tolist() for r in batch["input_ids"]]
        assert sorted(x for r in rows for x in r) == [1, 2, 3, 4, 5, 6, 7, 8] and batch["num_tokens"] == 8
    pairs = next(D.PairBatches(data, range(2), 8, 2, 0, pack=True, shuffle=False))
    ids, seq = pairs["input_ids"].flatten().tolist(), pairs["seq_ids"].flatten().tolist()
    assert pairs["num_pairs"] == 2 and 1 not in seq  # pair 0's rejected answer is empty
    assert {t: s for t, s in zip(ids, seq) if s >= 0} == {1: 0, 2: 0, 3: 0, 4: 2, 5: 2, 6: 3, 7: 3, 8: 3}


def test_tokens_the_post_processor_adds_take_the_flag_of_their_neighbour():
    class Wrapping:  # a tokenizer whose post-processor adds bos and eos (no characters: offsets (0, 0))
        eos_id = None

        def encode_with_offsets(self, text, bos=False):
            return [1] + [ord(c) for c in text] + [2], [(0, 0)] + [(k, k + 1) for k in range(len(text))] + [(0, 0)]
    ids, mask = D.tokenize_segments(Wrapping(), [("Q: ", False), ("A", True)])
    assert ids == [1, ord("Q"), ord(":"), ord(" "), ord("A"), 2]
    assert mask == [False, False, False, False, True, True]  # the closing token goes with the answer


def test_a_misspelt_record_key_is_refused_and_unknown_metadata_warned_once(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "add", "inputs": "1 and 2", "output": "3"}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: unknown key 'inputs'; did you mean 'input'\?"):
        list(D.read_records(str(path)))
    path.write_text("".join(json.dumps({"instruction": "add", "output": str(k), "source": "web"}) + "\n" for k in range(3)))
    with pytest.warns(UserWarning, match=r"d\.jsonl:1: key 'source' is in no record layout and is ignored") as caught:
        records = list(D.read_records(str(path)))
    assert len(records) == 3 and len([w for w in caught if "source" in str(w.message)]) == 1


def test_pairs_whose_chosen_and_rejected_are_the_same_are_warned(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.warns(UserWarning, match=r"p\.jsonl:2: chosen and rejected are the same text in 1 pair"):
        assert len(list(D.pair_records(D.read_records(str(path))))) == 4


def test_sharegpt_records_give_the_tokens_and_labels_of_the_same_messages(tmp_path):
    turns = [("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."), ("user", "Bye?"), ("assistant", "Bye.")]
    who = {"system": "system", "user": "human", "assistant": "gpt"}
    share, plain = tmp_path / "share.jsonl", tmp_path / "plain.json"
    share.write_text(json.dumps({"conversations": [{"from": who[r], "value": c} for r, c in turns]}) + "\n")
    plain.write_text(json.dumps([{"messages": [{"role": r, "content": c} for r, c in turns]}]))
    a, b = (D.load_documents(str(p), D.ByteTokenizer(), fmt="chatml") for p in (share, plain))
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask) and a.mask.sum() > 0
    share.write_text(json.dumps({"conversations": [{"from": "bot", "value": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"share\.jsonl:1: conversations\[0\] has unknown role 'bot'; expected one of "
                                         r"system, human, user, gpt, assistant"):
        D.load_documents(str(share), D.ByteTokenizer(), fmt="chatml")


def test_conversational_pairs_give_the_documents_of_string_pairs(tmp_path):
    user = {"role": "user", "content": "2+2?"}
    answer = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    strings = [{"messages": [user], "chosen": "4", "rejected": "5"}]
    implicit = [{"chosen": [user, answer("4")], "rejected": [user, answer("5")]}]  # TRL: the prompt is the common prefix
    explicit = [{"prompt": [user], "chosen": [answer("4")], "rejected": [answer("5")]}]
    docs = []
    for i, recs in enumerate((strings, implicit, explicit)):
        path = tmp_path / f"p{i}.json"
        path.write_text(json.dumps(recs))
        docs.append(D.in_memory(D.pair_records(D.read_records(str(path))), D.ByteTokenizer(), "chatml"))
    for other in docs[1:]:
        assert np.array_equal(other.tokens, docs[0].tokens) and np.array_equal(other.mask, docs[0].mask)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"chosen": [user, answer("4")], "rejected": [user]}]))
    with pytest.raises(ValueError, match=r"bad\.json\[0\]: 'rejected' must end with an assistant message"):
        list(D.pair_records(D.read_records(str(path))))


def test_parquet_files_and_datasets_folders_give_the_documents_of_the_same_jsonl(tmp_path):
    records = [{"instruction": f"add {i} and 1", "output": str(i + 1)} for i in range(30)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    want = D.load_documents(str(jsonl), D.ByteTokenizer(), str(tmp_path / "cache"))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet", row_group_size=7)
    got = D.load_documents(str(tmp_path / "d.parquet"), D.ByteTokenizer(), str(tmp_path / "cache"))
    assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.mask, want.mask)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable parquet file"):
        D.load_documents(str(tmp_path / "bad.parquet"), D.ByteTokenizer())
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "folder"))
    got = D.load_documents(str(tmp_path / "folder"), D.ByteTokenizer(), str(tmp_path / "cache"))
    assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.mask, want.mask)


def test_a_missing_optional_reader_is_named_in_one_line(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def without_pyarrow(name, *a, **kw):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", without_pyarrow)
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"d\.parquet: reading \.parquet needs pyarrow \(pip install pyarrow\)"):
        D.load_documents(str(tmp_path / "d.parquet"), D.ByteTokenizer())


def test_a_jsonl_file_is_read_a_line_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5)) + '{"text": "\xff"}\n')
    reads = []
    real_open = open

    def watched(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if str(file) == str(path):
            reads.append(f)
            f.read = lambda *a: pytest.fail("the whole file was read at once")  # iteration reads by line
        return f
    monkeypatch.setattr("builtins.open", watched)
    assert [r["text"] for r, _ in D.read_records(str(path))] == [f"line {i}" for i in range(5)] + ["\xff"]
    assert reads


def mixture_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text("".join(json.dumps({"text": f"a{i} " * 3}) + "\n" for i in range(40)))
    b.write_text(json.dumps([{"prompt": f"b{i}=", "completion": "x" * (i % 5 + 1)} for i in range(200)]))
    return str(a), str(b)


def test_a_mixture_draws_each_source_by_weight_with_its_own_held_out_split(tmp_path):
    import types
    a, b = mixture_files(tmp_path)
    cfg = types.SimpleNamespace(data=f"{a}:0.7,{b}:0.3", objective="sft", out_dir=str(tmp_path), data_cache="",
                                eval_frac=0.1, seq_len=64, batch_size=4, seed=3, pack=True)
    lines = []
    dataset, held, loader = D.load_for_training(cfg, D.ByteTokenizer(), 0, 1, lines.append, None, fmt="alpaca")
    assert len(dataset) == 240 and held == list(range(36, 40)) + list(range(220, 240))  # 10% of each, at its end
    order = loader.mixture.epoch_docs(0, cfg.seed)
    from_a = [d for d in order if d < 40]
    assert len(order) == 36 + 180 and len(from_a) == round(216 * 0.7)  # 151 draws from 36 documents: repeats
    assert not set(order) & set(held)  # never a held-out document
    assert set(from_a) == set(range(36)) and max(from_a.count(d) for d in from_a) == 5  # each 4 or 5 times
    assert loader.mixture.epoch_docs(0, cfg.seed) == order and loader.mixture.epoch_docs(1, cfg.seed) != order
    assert any(f"source {a}: 40 docs (4 held out), weight 0.7: 69.9% of an epoch's documents" in line for line in lines)
    first = [next(loader) for _ in range(5)]
    again = D.load_for_training(cfg, D.ByteTokenizer(), 0, 1, lines.append, None, fmt="alpaca")[2]
    again.load_state_dict({"epoch": 0, "index": 3})  # resumed mid-epoch: the same batches on
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first[3:], [next(again), next(again)]))


@pytest.mark.parametrize("spec,bad", [("a.jsonl:0,b.json:1", "'0'"), ("a.jsonl:-1", "'-1'"), ("a.jsonl:x,b.json", "'x'"),
                                      ("a.jsonl:inf", "'inf'")])
def test_a_mixture_weight_that_is_not_a_positive_number_is_refused(spec, bad):
    import train
    with pytest.raises(ValueError, match=rf"^--data: the weight of a\.jsonl is {bad}, expected a positive number"):
        train.parse_args([f"--data={spec}"])


def test_review_cases_metadata_ids_odd_paths_last_piece_and_roles(tmp_path):
    import types
    path = tmp_path / "ids.jsonl"  # *_id keys are metadata, not misspellings of prompt / conversations
    path.write_text(json.dumps({"prompt": "hi", "prompt_id": "x", "completion": "yo", "conversation_id": 3}) + "\n")
    with pytest.warns(UserWarning, match="prompt_id"):
        assert len(list(D.read_records(str(path)))) == 1
    odd = tmp_path / "a,b:2.jsonl"  # an existing file is one source, whatever its name
    odd.write_text(json.dumps({"text": "x"}) + "\n")
    assert D.parse_mixture(str(odd)) == [(str(odd), 1.0)]
    a, b = tmp_path / "m1.jsonl", tmp_path / "m2.jsonl"  # the last document a 9-token piece at seq_len 8
    a.write_text(json.dumps({"text": "aaaa"}) + "\n")
    b.write_text(json.dumps({"text": "eeeeeee"}) + "\n")
    cfg = types.SimpleNamespace(data=f"{a},{b}", objective="sft", out_dir=str(tmp_path), data_cache="", eval_frac=0,
                                seq_len=8, batch_size=1, seed=0, pack=True)
    _, _, loader = D.load_for_training(cfg, D.ByteTokenizer(), 0, 1, print, None, fmt="alpaca")
    assert sum(int(next(loader)["num_tokens"]) for _ in range(len(loader.plan(0)))) == 6 + 9
    share = tmp_path / "s.jsonl"
    share.write_text(json.dumps({"conversations": [{"from": ["gpt"], "value": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"s\.jsonl:1: conversations\[0\]: the role must be a string"):
        D.load_documents(str(share), D.ByteTokenizer(), fmt="chatml")


def test_a_record_with_two_layouts_a_source_listed_twice_and_epoch_counts(tmp_path):
    path = tmp_path / "both.jsonl"
    path.write_text(json.dumps({"instruction": "p", "output": "a", "messages": [{"role": "user", "content": "x"},
                                                                              {"role": "assistant", "content": "y"}]}) + "\n")
    with pytest.raises(ValueError, match=r"both\.jsonl:1: holds two record layouts \(instruction/output and messages\)"):
        D.load_documents(str(path), D.ByteTokenizer(), fmt="chatml")
    with pytest.raises(ValueError, match=r"--data: a\.jsonl is listed twice"):
        D.parse_mixture("a.jsonl:0.7,a.jsonl:0.3")
    mix = D.Mixture([range(285), range(95), range(190)], [0.7, 0.3, 1.0])
    assert mix.counts() == [200, 85, 285]  # 199.5, 85.5, 285 of 570: the largest remainders round up, to 570 in all
    assert len(mix.epoch_docs(0, 0)) == 570
