"""The reward process (``reward_placement.mode = "process"``): one process builds the
recipe's rewarders once and scores the samples that the training processes send it
over TCP, so that a run on many GPUs does not hold a copy of every reward model per
process.

Start one with ``mdmrl reward-server RECIPE --port PORT`` and give the run its
address (``reward_placement.address = "HOST:PORT"``), or leave the address out and
the run's main process starts one on 127.0.0.1 itself (and stops it at the end).

Protocol (no pickle): a connection carries request/answer frames, each
``MAGIC | u32 header length | u64 body length | header | body``, where the header is
UTF-8 JSON and the body a safetensors file (possibly empty). Requests:

- ``{"op": "hello", "protocol": 1, "rewards": DIGEST}``: the answer names the
  process's rewards, which must be the run's (same digest of the resolved
  ``[[rewards]]`` tables);
- ``{"op": "score", "prompts": [...], "grid_shape": [H, W]}`` with tensors
  ``tokens`` long [B, N] and, when sent, ``images`` float [B, 3, H_img, W_img]:
  the answer holds ``total`` float32 [B] and each component (``c0``, ``c1``, ... in
  the order of ``labels``). Without images, a rewarder that reads them makes the
  answer ``{"ok": false, "need_images": true}`` and the client sends them from then
  on.

Scores are those of the same :class:`~mdmrl.rewarding.CompositeRewarder` on the same
inputs in the training process: the tensors travel bit for bit.

The service has no authentication: it listens on 127.0.0.1 unless told otherwise
(``--host``); bind another interface only on a network you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from typing import Any

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import GeneratedBatch
from mdmrl.rewarding import (
    CompositeRewarder,
    RewardProcessError,
    component_labels,
    placement_device,
    stop_together,
)
from mdmrl.trajectory import RewardResult

PROTOCOL = 1
MAGIC = b"MDMRLRW1"
_PREFIX = struct.Struct(">8sIQ")
HEADER_LIMIT = 64 << 20
BODY_LIMIT = 64 << 30
READY = "mdmrl: reward process listening on "


class ProtocolError(Exception):
    """A frame that is not one of this protocol's."""


class _ImagesNeeded(Exception):
    """A rewarder read the images of a batch sent without them."""


# -- frames -----------------------------------------------------------------------------
def encode(header: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    from safetensors.torch import save

    head = json.dumps(header).encode("utf-8")
    body = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}) if tensors else b""
    return _PREFIX.pack(MAGIC, len(head), len(body)) + head + body


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
        chunk = sock.recv(min(n - got, 1 << 22))
        if not chunk:
            raise ConnectionResetError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive(
    sock: socket.socket, deadline: float | None = None
) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """One frame: (header, tensors); None when the peer closed the connection between
    frames. ``deadline``: time.monotonic() by which the whole frame must be in."""
    from safetensors.torch import load

    try:
        first = _recv_exact(sock, _PREFIX.size, deadline)
    except ConnectionResetError:
        return None
    magic, head_len, body_len = _PREFIX.unpack(first)
    if magic != MAGIC:
        raise ProtocolError("not an mdmrl reward-process frame")
    if head_len > HEADER_LIMIT or body_len > BODY_LIMIT:
        raise ProtocolError(f"frame too large (header {head_len} bytes, body {body_len} bytes)")
    try:
        header = json.loads(_recv_exact(sock, head_len, deadline).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    body = _recv_exact(sock, body_len, deadline) if body_len else b""
    try:
        tensors = load(body) if body else {}
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types
        raise ProtocolError(f"body is not a safetensors file ({exc})") from None
    return header, tensors


def rewards_digest(loaded: Any) -> str:
    """A digest of the recipe's resolved ``[[rewards]]`` tables (names, weights and
    every option): a reward process serves a run only when they are the same."""
    from mdmrl.recipe import resolved_dict

    data = resolved_dict(loaded)["rewards"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# -- the service -------------------------------------------------------------------------------
def _no_images(tokens: torch.Tensor) -> torch.Tensor:
    raise _ImagesNeeded


class RewardService:
    """Answers requests with one :class:`CompositeRewarder` (one request scores at a
    time: the reward models are used by one batch at a time, as in a training
    process)."""

    def __init__(self, rewarder: CompositeRewarder, digest: str, device: torch.device):
        self.rewarder = rewarder
        self.digest = digest
        self.device = torch.device(device)
        self.lock = threading.Lock()
        self.requests = 0

    def handle(self, header: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        op = header.get("op")
        if op == "hello":
            if header.get("protocol") != PROTOCOL:
                return {
                    "ok": False,
                    "error": f"protocol {header.get('protocol')!r}, this process speaks {PROTOCOL}",
                }, {}
            return {
                "ok": True,
                "rewards": self.digest,
                "labels": self.rewarder.labels,
                "device": str(self.device),
                "pid": os.getpid(),
            }, {}
        if op != "score":
            return {"ok": False, "error": f"unknown request {op!r}"}, {}
        problem = _check_score_request(header, tensors)
        if problem:
            return {"ok": False, "error": f"bad request: {problem}"}, {}
        batch = GeneratedBatch(
            list(header["prompts"]),
            tensors["tokens"].to(self.device),
            tuple(header["grid_shape"]),
            _no_images,
        )
        if "images" in tensors:
            batch._images = tensors["images"].to(self.device)
        try:
            with self.lock:
                self.requests += 1
                res = self.rewarder(batch)
        except _ImagesNeeded:
            return {"ok": False, "need_images": True}, {}
        except UserError as exc:
            return {"ok": False, "error": str(exc)}, {}
        except Exception as exc:  # noqa: BLE001 - reported to the run, which stops
            traceback.print_exc()
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, {}
        out = {"total": res.total}
        out.update({f"c{i}": res.components[label] for i, label in enumerate(self.rewarder.labels)})
        return {"ok": True, "labels": self.rewarder.labels}, out


def _check_score_request(header: dict, tensors: dict) -> str | None:
    prompts, grid = header.get("prompts"), header.get("grid_shape")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        return "prompts must be a list of strings"
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(x, int) for x in grid)):
        return "grid_shape must be two integers"
    tokens = tensors.get("tokens")
    if tokens is None or tokens.is_floating_point() or tokens.dim() < 1 or tokens.shape[0] != len(prompts):
        return f"tokens must be an integer tensor with one row per prompt ({len(prompts)})"
    images = tensors.get("images")
    if images is not None and (images.dim() != 4 or images.shape[0] != len(prompts)):
        return f"images must be [B, C, H, W] with B = {len(prompts)}"
    return None


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        service: RewardService = self.server.service  # type: ignore[attr-defined]
        sock = self.request
        while True:
            try:
                got = receive(sock)
            except ProtocolError as exc:
                print(
                    f"mdmrl: reward process: {self.client_address[0]}: {exc}; connection closed",
                    file=sys.stderr,
                )
                return
            except OSError:
                return
            if got is None:
                return
            answer, tensors = service.handle(*got)
            try:
                sock.sendall(encode(answer, tensors))
            except OSError:
                return


class RewardServer(socketserver.ThreadingTCPServer):
    """A :class:`RewardService` on a TCP port (``port`` 0: any free one)."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, host: str, port: int, service: RewardService):
        self.service = service
        super().__init__((host, port), _Handler)

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"


def build_service(loaded: Any, recipe_dir: str | None = None) -> RewardService:
    """The recipe's rewarders, built alone (no backbone) on ``reward_placement.device``
    (default: the recipe's device)."""
    from mdmrl.build import build_part, parts_seed, resolve_device
    from mdmrl.interfaces import BuildContext

    r = loaded.recipe
    device = placement_device(r.reward_placement.device, resolve_device(r.device))
    ctx = BuildContext(device=device, backbone=None, recipe_dir=recipe_dir or loaded.directory)
    components = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(parts_seed(r.seed))
        for i, spec in enumerate(r.rewards):
            try:
                rewarder = build_part(loaded, f"rewards[{i}]", "rewarder", spec.name, ctx)
            except (UserError, AttributeError) as exc:
                if isinstance(exc, AttributeError) or "backbone" in str(exc):
                    raise UserError(
                        f"rewards[{i}] ({spec.name!r}) needs the backbone, which a reward process does "
                        f'not load ({exc}); use reward_placement.mode = "rank" or "device" for it'
                    ) from None
                raise
            components.append((spec.name, spec.weight, rewarder))
    return RewardService(CompositeRewarder(components), rewards_digest(loaded), device)


def serve_command(
    recipe_path: str,
    overrides: list[str],
    host: str = "127.0.0.1",
    port: int = 0,
    recipe_dir: str | None = None,
    exit_when_stdin_closes: bool = False,
) -> int:
    """``mdmrl reward-server``: build the rewards, print the ready line on stdout, serve
    until Ctrl-C (or, for the run's own reward process, until the run's end closes
    this process's stdin)."""
    from mdmrl import recipe as rc

    if not 0 <= port <= 65535:
        raise UserError(f"--port: {port} is not allowed; use 1..65535, or 0 for any free port")
    service = build_service(rc.load(recipe_path, overrides), recipe_dir)
    try:
        server = RewardServer(host, port, service)
    except OSError as exc:
        raise UserError(f"reward-server: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    labels = ", ".join(service.rewarder.labels)
    print(
        f"{READY}{server.address} (rewards: {labels}; device {service.device}; pid {os.getpid()})", flush=True
    )
    if exit_when_stdin_closes:

        def watch() -> None:
            while sys.stdin.buffer.read(1 << 16):
                pass
            os._exit(0)  # the run that started this process is gone

        threading.Thread(target=watch, daemon=True, name="mdmrl-parent-watch").start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"mdmrl: reward process at {server.address} stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


# -- the client ---------------------------------------------------------------------------------
class RemoteRewarder:
    """Scores batches in a reward process: a drop-in for the local composite
    (``rewarder(batch) -> RewardResult``). Every request has ``timeout_s`` seconds;
    a reward process that is gone or silent is a :class:`RewardProcessError` naming
    it."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout_s: float,
        digest: str,
        labels: list[str],
        process: subprocess.Popen | None = None,
    ):
        self.host, self.port = host, int(port)
        self.timeout_s = float(timeout_s)
        self.digest = digest
        self.labels = labels
        self.process = process
        self.needs_images = False
        self.answered = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _gone(self, why: str) -> RewardProcessError:
        where = f"reward process at {self.address}"
        if self.process is not None and self.process.poll() is not None:
            return RewardProcessError(f"{where} died (exit code {self.process.returncode})")
        if self.answered:
            return RewardProcessError(f"{where} died ({why})")
        return RewardProcessError(
            f"{where} is not reachable ({why}); start it with: mdmrl reward-server RECIPE --port {self.port}"
        )

    def request(self, header: dict, tensors: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        frame = encode(header, tensors)
        deadline = time.monotonic() + self.timeout_s
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout_s) as sock:
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                sock.sendall(frame)
                got = receive(sock, deadline)
        except TimeoutError:
            raise RewardProcessError(
                f"reward process at {self.address} did not answer within {self.timeout_s:g} s "
                "(reward_placement.timeout_s)"
            ) from None
        except ConnectionRefusedError:
            raise self._gone("connection refused") from None
        except ProtocolError as exc:
            raise RewardProcessError(f"{self.address} is not an mdmrl reward process ({exc})") from None
        except OSError as exc:
            raise self._gone(exc.strerror or str(exc) or type(exc).__name__) from None
        if got is None:
            raise self._gone("connection closed")
        self.answered = True
        return got

    def hello(self) -> dict:
        answer, _ = self.request({"op": "hello", "protocol": PROTOCOL, "rewards": self.digest})
        if not answer.get("ok"):
            raise RewardProcessError(f"reward process at {self.address}: {answer.get('error')}")
        if answer.get("rewards") != self.digest:
            raise UserError(
                f"reward_placement.address: the reward process at {self.address} scores other rewards "
                f"({', '.join(answer.get('labels', []))}) than this recipe's [[rewards]] "
                f"({', '.join(self.labels)}, same names, weights and options needed); start it with this recipe"
            )
        return answer

    def __call__(self, batch: GeneratedBatch) -> RewardResult:
        header = {
            "op": "score",
            "prompts": list(batch.prompts),
            "grid_shape": [int(x) for x in batch.grid_shape],
        }
        while True:
            tensors = {"tokens": batch.tokens}
            if self.needs_images:
                tensors["images"] = batch.images
            answer, out = self.request(header, tensors)
            if answer.get("need_images") and not self.needs_images:
                self.needs_images = True
                continue
            if not answer.get("ok"):
                raise RewardProcessError(f"reward process at {self.address}: {answer.get('error')}")
            labels = answer.get("labels")
            if labels != self.labels or "total" not in out:
                raise RewardProcessError(
                    f"reward process at {self.address} answered other components ({labels})"
                )
            return RewardResult(
                total=out["total"], components={label: out[f"c{i}"] for i, label in enumerate(labels)}
            )


# -- the run's own reward process -----------------------------------------------------------------
def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


def start_local(loaded: Any, timeout_s: float) -> tuple[subprocess.Popen, int]:
    """Start ``mdmrl reward-server`` for the run's recipe on 127.0.0.1 (a free port) and
    wait for its ready line. It stops when this process ends (its stdin closes)."""
    from mdmrl import recipe as rc

    fd, path = tempfile.mkstemp(prefix="mdmrl-reward-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(rc.dump_toml(rc.resolved_dict(loaded, effective=True)))
    cmd = [sys.executable, "-m", "mdmrl", "reward-server", path, "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--recipe-dir", os.path.abspath(loaded.directory), "--exit-when-stdin-closes"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    }
    # its own session: a Ctrl-C at the terminal asks the run to finish its iteration, and
    # that iteration still needs the reward process
    process = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True
    )
    lines: queue.Queue = queue.Queue()

    def read() -> None:  # to our stderr; the ready line also to us
        ready = False
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace")
            if not ready and line.startswith(READY):
                ready = True
                lines.put(line)
            sys.stderr.write(line)
        lines.put("")

    threading.Thread(target=read, daemon=True, name="mdmrl-reward-process-output").start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 1e-3))
            except queue.Empty:
                _stop(process)
                raise RewardProcessError(
                    f"the reward process did not start within {timeout_s:g} s (reward_placement.timeout_s)"
                ) from None
            if line.startswith(READY):
                port = int(line[len(READY) :].split()[0].rsplit(":", 1)[1])
                return process, port
            if not line:
                code = process.wait()
                raise RewardProcessError(
                    f"the reward process exited with code {code} before it was ready (its error is printed above)"
                )
    finally:
        os.unlink(path)


def connect(loaded: Any, dist: Any) -> RemoteRewarder:
    """The client of the run's reward process, on every process of the run: the one at
    ``reward_placement.address``, or one that the main process starts now. Every
    process checks that it answers and serves this recipe's rewards; a failure on any
    stops them all."""
    import torch.distributed as td

    p = loaded.recipe.reward_placement
    labels = component_labels([spec.name for spec in loaded.recipe.rewards])
    digest = rewards_digest(loaded)
    process = None
    if p.address is not None:
        host, _, port_text = p.address.rpartition(":")
        port = int(port_text)
    else:
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        if dist.world_size > per_machine:
            raise UserError(
                "reward_placement.address: this run spans several machines, and a reward process that "
                "the run starts serves one; start one with `mdmrl reward-server RECIPE --host HOST "
                '--port PORT` and set address = "HOST:PORT"'
            )
        host, port, failure = "127.0.0.1", -1, None
        if dist.is_main:
            try:
                process, port = start_local(loaded, p.timeout_s)
            except UserError as exc:
                failure = exc
        if dist.active:
            t = torch.tensor([port], dtype=torch.long, device=dist.accelerator.device)
            td.broadcast(t, src=0)
            port = int(t.item())
        if port < 0:
            if failure is not None:
                raise failure
            raise RewardProcessError(
                "the reward process did not start (its error is printed by the main process)"
            )
    client = RemoteRewarder(host, port, p.timeout_s, digest, labels, process)
    if process is not None:
        weakref.finalize(client, _stop, process)
    failure = None
    try:
        client.hello()
    except UserError as exc:
        failure = exc
    stop_together(dist, failure)
    return client
