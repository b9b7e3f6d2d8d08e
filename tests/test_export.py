"""The hf/ export as other tools read it: the source folder's files and the chat template the run
trained in, so that transformers' apply_chat_template gives the trained tokens."""
import os
import shutil

import pytest
import torch
from conftest import small_model

import hf
import build
import data as D
import train

CHAT = [{"role": "user", "content": "What is 6 times 7?"}, {"role": "assistant", "content": "It is 42."}]
ALPACA = {"instruction": "What is 6 times 7?", "output": "It is 42."}


def base_folder(tmp_path, smollm2_dir, template, special=()):
    """A small random model with SmolLM2's tokenizer files (and its chat template or none; `special`
    tokens added, as a Llama 3 tokenizer has its header tokens), a README."""
    from tokenizers import AddedToken, Tokenizer
    folder = tmp_path / ("base" if template else "base_no_template")
    model = small_model(vocab_size=49216, bos_token_id=1, eos_token_id=2)
    names = ["tokenizer_config.json", "generation_config.json"] + (["chat_template.jinja"] * template)
    files = {n: open(os.path.join(smollm2_dir, n), "rb").read() for n in names}
    tok = Tokenizer.from_file(os.path.join(smollm2_dir, "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    files["tokenizer.json"] = tok.to_str().encode()
    hf.save_pretrained(model, str(folder), dtype=torch.float32, extra_files={**files, "README.md": b"# a model card\n"})
    return str(folder)


@pytest.mark.parametrize("fmt", ["chatml", "llama3", "alpaca"])
def test_built_in_formats_as_jinja_templates_render_the_text_they_train_on(fmt):
    pytest.importorskip("jinja2")
    turns = [(m["role"], m["content"]) for m in CHAT]
    if fmt == "alpaca":
        segments, _, _, _ = D.record_segments(ALPACA, "record")
        trained = "".join(text for text, _ in segments) + "</s>"
        prompt = D.alpaca_prompt(ALPACA["instruction"])
    else:
        trained = "".join(text for text, _ in D.chat_segments(turns, fmt))
        prompt = D.chat_prompt(turns[:1], fmt)
    template = D.format_template(fmt, eos_token="</s>")
    assert D.render_template(template, turns, False) == trained
    assert D.render_template(template, turns[:1], True) == prompt


@pytest.mark.parametrize("fmt,template", [("template", True), ("chatml", False), ("llama3", False), ("alpaca", False),
                                          ("chatml", True)])
def test_exported_tokenizer_applies_the_chat_template_the_run_trained_in(tmp_path, smollm2_dir, fmt, template):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    base = base_folder(tmp_path, smollm2_dir, template, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tok = D.load_tokenizer(base, eos_id=2, bos_id=1)
    files = build.export_files(build.source_files(base), tok, fmt, chat_data=True)
    assert {"tokenizer.json", "generation_config.json", "README.md", "chat_template.jinja"} <= set(files)
    assert "config.json" not in files and "model.safetensors" not in files  # written afresh, not copied
    hf.save_pretrained(small_model(vocab_size=49216), str(tmp_path / "hf"), extra_files=files)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    record = ALPACA if fmt == "alpaca" else {"messages": CHAT}
    (ids, _, _, _, _), = D.tokenize_records([(record, "record")], tok, fmt)
    messages = [{"role": "user", "content": ALPACA["instruction"]}, CHAT[1]] if fmt == "alpaca" else CHAT
    rendered = hf_tok.apply_chat_template(messages, tokenize=True)
    assert list(rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered) == ids


def test_a_lora_run_exports_its_template_and_the_merged_model_answers_as_base_plus_adapter(tmp_path, smollm2_dir):
    pytest.importorskip("jinja2")
    base = base_folder(tmp_path, smollm2_dir, template=False)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join('{"messages": [{"role": "user", "content": "Say %d."}, '
                              '{"role": "assistant", "content": "%d."}]}' % (i, i) for i in range(40)))
    out = str(tmp_path / "out")
    train.main([f"--model={base}", f"--data={data}", "--chat_format=chatml", "--train_type=lora", "--max_steps=2",
                "--seq_len=64", "--batch_size=4", "--lr=1e-2", "--eval_samples=0", "--samples=0", "--precision=fp32",
                "--hf_dtype=fp32", f"--out_dir={out}"])
    hf = os.path.join(out, "hf")
    assert open(os.path.join(hf, "README.md")).read() == "# a model card\n"
    assert open(os.path.join(hf, "chat_template.jinja")).read() == D.format_template("chatml")
    ask = ["--ask=Say 3.", "--max_new_tokens=6", "--precision=fp32"]  # the export's template; the base has none
    merged = train.main([f"--model={hf}", *ask])
    with_adapter = train.main([f"--model={base}", f"--adapter_path={out}/adapter", "--chat_format=chatml", *ask])
    assert merged == with_adapter
    with pytest.raises(ValueError, match=r"--adapter_path=.*/adapter is already merged into --model=.*/hf \(.*merged_adapters.json"):
        train.main([f"--model={hf}", f"--adapter_path={out}/adapter", *ask])  # it would apply twice
    shutil.rmtree(out)


def test_with_a_tokenizer_folder_every_tokenizer_file_comes_from_it_alone(tmp_path):
    model, tokenizer = tmp_path / "model", tmp_path / "tokenizer"
    for folder, names in ((model, ["config.json", "model.safetensors", "generation_config.json", "README.md",
                                   "tokenizer.json", "tokenizer.model", "special_tokens_map.json", "chat_template.jinja",
                                   "rust_model.ot", "tf_model.h5"]),
                          (tokenizer, ["config.json", "tokenizer.json", "tokenizer_config.json", "LICENSE"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_text(name)
    files = build.source_files(str(model), str(tokenizer))
    assert files == {"generation_config.json": str(model / "generation_config.json"), "README.md": str(model / "README.md"),
                     "tokenizer.json": str(tokenizer / "tokenizer.json"),
                     "tokenizer_config.json": str(tokenizer / "tokenizer_config.json")}
    assert set(build.source_files(str(model))) == {"generation_config.json", "README.md", "tokenizer.json",
                                                   "tokenizer.model", "special_tokens_map.json", "chat_template.jinja"}
