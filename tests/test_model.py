"""Model and objective against the reference formula. Run: pytest tests/test_model.py"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vae_dist.files import pickle_kind
from vae_dist.losses import loss_terms
from vae_dist.model import VAE, ModelFileError


def reference_loss(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The original script's ELBO_loss per example: sigmoid decoder + binary_cross_entropy + KLD."""
    enc, dec = model.encoder, model.decoder
    h = enc(x)
    mu, log_var = model.mu(h), model.log_var(h)
    z = mu + torch.exp(0.5 * log_var) * eps
    recon_x = torch.sigmoid(dec(z))
    out = []
    for i in range(x.shape[0]):
        bce = F.binary_cross_entropy(recon_x[i], x[i], reduction="sum")
        kld = -0.5 * torch.sum(1 + log_var[i] - mu[i].pow(2) - log_var[i].exp())
        out.append(bce + kld)
    return torch.stack(out)


def test_architecture_matches_reference() -> None:
    model = VAE(784, [512, 256], 2)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [
        (512, 784),
        (512,),
        (256, 512),
        (256,),
        (2, 256),
        (2,),
        (2, 256),
        (2,),
        (256, 2),
        (256,),
        (512, 256),
        (512,),
        (784, 512),
        (784,),
    ]


def test_loss_equals_reference_formula() -> None:
    torch.manual_seed(0)
    model = VAE(784, [512, 256], 2)
    x = torch.rand(16, 784)
    eps = torch.randn(16, 1, 2)
    terms = loss_terms(model, x, eps)
    ref = reference_loss(model, x, eps[:, 0])
    assert torch.allclose(terms["elbo"], ref, rtol=1e-5, atol=0)
    assert torch.allclose(terms["loss"], terms["recon"] + terms["kl"])
    assert terms["elbo"].shape == (16,)


def test_iwae_with_one_sample_is_the_single_sample_elbo() -> None:
    """With k = 1 the IWAE bound is log p(x|z) + log p(z) - log q(z|x) at the same z (Burda et al. 2016)."""
    torch.manual_seed(1)
    model = VAE(784, [64, 32], 3)
    x = torch.rand(8, 784)
    eps = torch.randn(8, 1, 3)
    iwae = loss_terms(model, x, eps, "iwae")["loss"]
    mu, log_var = model.encode(x)
    z = mu + torch.exp(0.5 * log_var) * eps[:, 0]
    log_q = torch.distributions.Normal(mu, torch.exp(0.5 * log_var)).log_prob(z).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    recon = F.binary_cross_entropy_with_logits(model.decode(z), x, reduction="none").sum(-1)
    assert torch.allclose(iwae, recon + log_q - log_p, rtol=1e-5)


def test_iwae_bound_is_tighter_on_average() -> None:
    torch.manual_seed(2)
    model = VAE(784, [64, 32], 3)
    x = torch.rand(32, 784)
    one = loss_terms(model, x, torch.randn(32, 1, 3), "iwae")["loss"].mean()
    many = loss_terms(model, x, torch.randn(32, 200, 3), "iwae")["loss"].mean()
    assert many < one


def test_export_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = VAE(784, [64, 32], 5)
    model.save_pretrained(tmp_path)
    loaded = VAE.from_pretrained(tmp_path)
    assert loaded.z_dim == 5
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["config"]) == {"x_dim": 784, "hidden_dims": [64, 32], "z_dim": 5}
    assert json.loads((tmp_path / "config.json").read_text())["z_dim"] == 5


def test_log_var_is_clamped_to_a_finite_range() -> None:
    model = VAE(784, [8], 2)
    with torch.no_grad():
        model.log_var.bias.fill_(1e4)
    terms = loss_terms(model, torch.rand(4, 784), torch.randn(4, 1, 2))
    assert all(math.isfinite(v) for v in terms["kl"].tolist())


# ---------------------------------------------------------------- loading exported models safely
def write_torch_pickle(path: Path, fmt: str) -> Path:
    """What torch.save writes: a zip archive (the default) or a raw pickle (the legacy format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


PICKLE_PHRASES = {"zip": "PyTorch zip archive written by torch.save", "raw": "raw pickle written by torch.save"}


@pytest.mark.parametrize("fmt", ["zip", "raw"])
def test_pickle_kind_recognises_both_torch_save_formats(tmp_path: Path, fmt: str) -> None:
    file = write_torch_pickle(tmp_path / "model.safetensors", fmt)
    assert PICKLE_PHRASES[fmt] in pickle_kind(file)
    # Truncated, it is still recognised (a zip by its first entry, a raw pickle by its first bytes).
    (tmp_path / "cut").write_bytes(file.read_bytes()[:100])
    assert "pickle" in pickle_kind(tmp_path / "cut")


def test_pickle_kind_leaves_safetensors_alone(tmp_path: Path) -> None:
    VAE(784, [16], 2).save_pretrained(tmp_path)
    assert pickle_kind(tmp_path / "model.safetensors") is None
    # A safetensors header of 640 bytes starts with b"\x80\x02", like a protocol-2 pickle.
    header = b'{"__metadata__":{"pad":"' + b"x" * 600 + b'"}}'
    header += b" " * (640 - len(header))
    (tmp_path / "640.safetensors").write_bytes(struct.pack("<Q", 640) + header)
    assert (tmp_path / "640.safetensors").read_bytes()[:2] == b"\x80\x02"
    assert pickle_kind(tmp_path / "640.safetensors") is None
    assert pickle_kind(tmp_path / "config.json") is None and pickle_kind(tmp_path / "nowhere") is None


@pytest.mark.parametrize("fmt", ["zip", "raw"])
def test_from_pretrained_refuses_a_pickle_whatever_its_name(tmp_path: Path, fmt: str) -> None:
    VAE(784, [16], 2).save_pretrained(tmp_path)
    write_torch_pickle(tmp_path / "model.safetensors", fmt)
    for source in (tmp_path, tmp_path / "model.safetensors"):
        with pytest.raises(ModelFileError, match="pickle") as err:
            VAE.from_pretrained(source)
        assert str(tmp_path / "model.safetensors") in str(err.value) and "arbitrary code" in str(err.value)
    with pytest.raises(ModelFileError, match="pickle"):
        VAE.from_pretrained(write_torch_pickle(tmp_path / "weights.bin", fmt))


def test_from_pretrained_is_strict_and_names_the_keys(tmp_path: Path) -> None:
    VAE(784, [16], 2).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["mu.bias"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileError) as err:
        VAE.from_pretrained(tmp_path)
    assert "mu.bias: missing" in str(err.value) and "extra.weight: unexpected" in str(err.value)
    assert str(tmp_path / "model.safetensors") in str(err.value)
    assert VAE.from_pretrained(tmp_path, strict=False).z_dim == 2  # asked for: missing/unexpected allowed
    # A wrong shape is an error even with strict=False: config.json says z = 3, the weights are z = 2.
    (tmp_path / "config.json").write_text(json.dumps({"x_dim": 784, "hidden_dims": [16], "z_dim": 3}))
    for strict in (True, False):
        with pytest.raises(ModelFileError, match=r"mu.weight: file \(2, 16\) vs model \(3, 16\)"):
            VAE.from_pretrained(tmp_path, strict=strict)


def test_from_pretrained_problems_are_one_error_type(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        VAE.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ModelFileError, match="holds no model.safetensors"):
        VAE.from_pretrained(tmp_path)
    VAE(784, [16], 5).save_pretrained(tmp_path)
    blob = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelFileError, match="model.safetensors is not a readable safetensors file .*truncated"):
        VAE.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(blob)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="config.json is not valid JSON"):
        VAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"x_dim": 784, "hidden_dims": "many", "z_dim": 5}))
    with pytest.raises(ModelFileError, match="does not build a VAE"):
        VAE.from_pretrained(tmp_path)
    # Without config.json the model config comes from the file's metadata.
    (tmp_path / "config.json").unlink()
    assert VAE.from_pretrained(tmp_path).z_dim == 5


# A stand-in for the Hugging Face Hub on loopback: `owner/vae` holds a model, any other id is answered
# as the Hub answers an unknown repository. Run in a fresh interpreter because huggingface_hub reads
# HF_ENDPOINT and HF_HUB_OFFLINE when it is imported; HF_HOME keeps its cache inside tmp_path.
HUB_SCRIPT = r"""
import hashlib, http.server, json, os, sys, threading, time
from pathlib import Path

files = {"owner/vae": {n: Path(sys.argv[1], n).read_bytes() for n in ("config.json", "model.safetensors")}}
asked = []

class Hub(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        asked.append(self.path)
        repo, _, rest = self.path.lstrip("/").partition("/resolve/")
        data = files.get(repo, {}).get(rest.partition("/")[2])
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
threading.Thread(target=server.serve_forever, daemon=True).start()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"

from huggingface_hub import constants
from vae_dist.model import VAE, ModelFileError

def attempt(name):
    t0 = time.perf_counter()
    try:
        return VAE.from_pretrained(name).z_dim, time.perf_counter() - t0
    except ModelFileError as err:
        return str(err), time.perf_counter() - t0

out = {"typo": attempt("runs/typo"), "hub": attempt("owner/vae"), "asked": list(asked)}
server.shutdown()
server.server_close()
out["no_network"] = attempt("runs/typo")  # nothing listens on that port any more: connection refused
constants.HF_HUB_OFFLINE = True  # what HF_HUB_OFFLINE=1 sets at import
out["offline_typo"] = attempt("runs/typo")
out["offline_cached"] = attempt("owner/vae")
print(json.dumps(out))
"""


def test_from_pretrained_tries_a_folder_then_the_hub_once(tmp_path: Path) -> None:
    """A path that does not exist is one ModelFileError naming both places tried, fast offline; a Hub id
    the Hub holds still loads from the Hub, and from the cache once offline."""
    VAE(784, [16], 3).save_pretrained(tmp_path / "served")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(tmp_path / "served")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    message, _ = out["typo"]
    assert message.startswith(f"runs/typo is neither a folder or file in {tmp_path} nor a model")
    assert "answered RepositoryNotFoundError" in message and "pass a folder written by vae-train" in message
    assert out["hub"][0] == 3  # a real Hub id still downloads from the Hub
    assert "/runs/typo/resolve/main/model.safetensors" in out["asked"]
    assert "/owner/vae/resolve/main/model.safetensors" in out["asked"]
    for key, why in (("no_network", "could not be reached: ConnectError"), ("offline_typo", "HF_HUB_OFFLINE is set")):
        message, seconds = out[key]
        assert message.startswith(f"runs/typo is neither a folder or file in {tmp_path} nor a model in the local")
        assert why in message and seconds < 5, (message, seconds)  # huggingface_hub alone retries for ~26 s
    assert "Retrying" not in proc.stderr, proc.stderr[-2000:]
    assert out["offline_cached"][0] == 3  # offline, a model downloaded before loads from the cache


def test_the_model_card_says_what_the_folder_holds(tmp_path: Path) -> None:
    """The README.md that save_pretrained writes (vae-train's export included) claims no upload."""
    VAE(784, [16], 2).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "pushed to the Hub" not in card and "More Information Needed" not in card
    assert card.startswith("---\nlibrary_name: vae_dist\n")  # the Hub's card metadata, for a later upload
    assert "VAE.from_pretrained(" in card and "config.json" in card and "model.safetensors" in card
