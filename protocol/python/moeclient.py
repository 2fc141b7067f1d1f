"""moeclient: a pure-Python client for moed (needs only numpy).

Data plane (protocol v1, see protocol/PROTOCOL.md): ``Client`` sends token
activations as float32, bfloat16 or float16 and returns float32 arrays.
Control channel: ``ControlClient`` sends JSON commands and reads events.
"""
import itertools
import json
import socket
import struct

import numpy as np

__all__ = ["Client", "ControlClient", "MoedError", "ControlError", "ProtocolError",
           "HEADER", "encode_header", "decode_header", "f32_to_bf16", "bf16_to_f32",
           "STATUS_NAMES", "DTYPES"]

MAGIC = b"MOED"
VERSION = 1
FORWARD, RESULT, ERROR, PING, PONG = 1, 2, 3, 4, 5
FLAG_ROUTED = 0x1
# offset: magic 0, version 4, type 6, request_id 8, layer 16, n_tokens 20,
# hidden 24, dtype 28, flags 29, top_k 30, status 32, reserved 36, payload_len 40
HEADER = struct.Struct("<4sHHQIIIBBHIIQ")
assert HEADER.size == 48
DTYPES = {"f32": 1, "bf16": 2, "f16": 3}
DTYPE_SIZE = {1: 4, 2: 2, 3: 2}
STATUS_NAMES = {0: "ok", 1: "bad_layer", 2: "bad_shape", 3: "bad_dtype", 4: "too_large",
                5: "overloaded", 6: "shutting_down", 7: "timeout", 8: "internal",
                9: "bad_frame", 10: "bad_routing"}
MAX_FRAME_BYTES = 1 << 30



class _Closing:
    """Context-manager plumbing shared by the clients: `with` closes the socket."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()

class ProtocolError(Exception):
    """The server sent something that is not protocol v1, or hung up."""


class MoedError(Exception):
    """An ERROR frame: the request failed, the connection is still usable
    (unless the status is bad_frame)."""

    def __init__(self, status, name, message, request_id=None):
        super().__init__(f"{name} ({status}): {message}")
        self.status, self.name, self.message, self.request_id = status, name, message, request_id


class ControlError(Exception):
    """A control reply with ok:false."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def encode_header(type, request_id=0, layer=0, n_tokens=0, hidden=0, dtype=0, flags=0,
                  top_k=0, status=0, payload_len=0, version=VERSION):
    return HEADER.pack(MAGIC, version, type, request_id, layer, n_tokens, hidden, dtype, flags,
                       top_k, status, 0, payload_len)


def decode_header(data):
    """Decodes 48 bytes into a dict; raises ProtocolError on bad magic/version/type."""
    (magic, version, type, request_id, layer, n_tokens, hidden, dtype, flags, top_k, status,
     _reserved, payload_len) = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError("bad magic %r" % magic)
    if version != VERSION:
        raise ProtocolError("unsupported protocol version %d" % version)
    if not FORWARD <= type <= PONG:
        raise ProtocolError("unknown frame type %d" % type)
    return dict(type=type, request_id=request_id, layer=layer, n_tokens=n_tokens, hidden=hidden,
                dtype=dtype, flags=flags, top_k=top_k, status=status, payload_len=payload_len)


def f32_to_bf16(x):
    """float32 array -> uint16 bfloat16 bits, round to nearest even, NaN kept NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((bits >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)


def bf16_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _encode_values(x, dtype):
    if dtype == 1:
        return x.astype("<f4", copy=False).tobytes()
    if dtype == 2:
        return f32_to_bf16(x).astype("<u2", copy=False).tobytes()
    with np.errstate(over="ignore"):  # out of range becomes inf, as in IEEE
        return x.astype("<f2").tobytes()  # numpy's float16 cast rounds to nearest even


def _decode_values(payload, dtype, shape):
    if dtype == 1:
        return np.frombuffer(payload, dtype="<f4").astype(np.float32).reshape(shape)
    if dtype == 2:
        return bf16_to_f32(np.frombuffer(payload, dtype="<u2")).reshape(shape)
    if dtype == 3:
        return np.frombuffer(payload, dtype="<f2").astype(np.float32).reshape(shape)
    raise ProtocolError("RESULT with unknown dtype %d" % dtype)


def _dial(address, rank):
    """Connects to "unix:PATH" (%r -> rank) or "HOST:PORT" (port + rank)."""
    if address.startswith("unix:"):
        path = address[5:].replace("%r", str(rank)) if rank is not None else address[5:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return sock
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("address %r is not HOST:PORT or unix:PATH" % address)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    sock = socket.create_connection((host, int(port) + (rank or 0)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Client(_Closing):
    """One connection to one rank's data plane. Not thread-safe."""

    def __init__(self, address="127.0.0.1:7600", rank=0, timeout=30):
        self.sock = _dial(address, rank)
        self.sock.settimeout(timeout)
        self._ids = itertools.count(1)
        self._buffered = {}  # request_id -> (header, payload), in arrival order
        self._pending = {}   # request_id -> (n_tokens, hidden) of submitted requests

    def _recv_exact(self, n):
        chunks, left = [], n
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                raise ProtocolError("connection closed by server")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _read_frame(self):
        header = decode_header(self._recv_exact(HEADER.size))
        if header["payload_len"] + HEADER.size > MAX_FRAME_BYTES:
            raise ProtocolError("frame of %d bytes over the limit" % header["payload_len"])
        if header["type"] == RESULT:
            want = header["n_tokens"] * header["hidden"] * DTYPE_SIZE.get(header["dtype"], 0)
            if want != header["payload_len"]:
                raise ProtocolError("RESULT payload_len %d does not match its shape"
                                    % header["payload_len"])
        return header, self._recv_exact(header["payload_len"])

    def _wait(self, request_id):
        """The frame answering request_id (None: the next one), buffering others."""
        if request_id is None and self._buffered:
            key = next(iter(self._buffered))
            return self._buffered.pop(key)
        if request_id in self._buffered:
            return self._buffered.pop(request_id)
        while True:
            header, payload = self._read_frame()
            if request_id is None or header["request_id"] == request_id:
                return header, payload
            self._buffered[header["request_id"]] = (header, payload)

    def submit(self, layer, x, dtype="f32", routed=None, request_id=None):
        """Sends one FORWARD of x [n_tokens, hidden]; returns its request_id.
        routed: optional (ids [n_tokens, top_k] int, weights [n_tokens, top_k] float)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise ValueError("x must be [n_tokens, hidden]")
        code = DTYPES[dtype] if isinstance(dtype, str) else int(dtype)
        payload = [_encode_values(np.ascontiguousarray(x), code)]
        flags = top_k = 0
        if routed is not None:
            ids = np.ascontiguousarray(routed[0], dtype="<i4")
            weights = np.ascontiguousarray(routed[1], dtype="<f4")
            if ids.shape != weights.shape or ids.ndim != 2 or ids.shape[0] != x.shape[0]:
                raise ValueError("routed ids and weights must both be [n_tokens, top_k]")
            flags, top_k = FLAG_ROUTED, ids.shape[1]
            payload += [ids.tobytes(), weights.tobytes()]
        if request_id is None:
            request_id = next(self._ids)
        length = sum(len(p) for p in payload)
        head = encode_header(FORWARD, request_id, layer, x.shape[0], x.shape[1], code, flags,
                             top_k, 0, length)
        self.sock.sendall(b"".join([head] + payload))
        self._pending[request_id] = x.shape
        return request_id

    def result(self, request_id=None):
        """(request_id, float32 array) of a submitted request (None: whichever
        comes next). Raises MoedError for an ERROR frame."""
        header, payload = self._wait(request_id)
        rid = header["request_id"]
        self._pending.pop(rid, None)
        if header["type"] == ERROR:
            status = header["status"]
            raise MoedError(status, STATUS_NAMES.get(status, "unknown"),
                            payload.decode("utf-8", "replace"), rid)
        if header["type"] != RESULT:
            raise ProtocolError("unexpected frame type %d for request %d" % (header["type"], rid))
        shape = (header["n_tokens"], header["hidden"])
        return rid, _decode_values(payload, header["dtype"], shape)

    def forward(self, layer, x, dtype="f32", routed=None):
        """One blocking request: returns the layer output as float32 [n_tokens, hidden]."""
        return self.result(self.submit(layer, x, dtype, routed))[1]

    def ping(self, payload=b"ping"):
        """Round trip of a PING; returns the seconds it took."""
        import time
        request_id = next(self._ids)
        start = time.perf_counter()
        self.sock.sendall(encode_header(PING, request_id, payload_len=len(payload)) + payload)
        header, echoed = self._wait(request_id)
        if header["type"] != PONG or echoed != payload:
            raise ProtocolError("PING answered by frame type %d" % header["type"])
        return time.perf_counter() - start

    def send_raw(self, data):
        """Writes bytes as they are (for tests of malformed frames)."""
        self.sock.sendall(data)


class ControlClient(_Closing):
    """The JSON control channel on rank 0: call(cmd, **args) -> result."""

    def __init__(self, address="unix:/tmp/moed-control.sock", token=None, timeout=30):
        self.sock = _dial(address, None)
        self.sock.settimeout(timeout)
        self.token = token
        self._ids = itertools.count(1)
        self._buf = b""
        self._events = []

    def _line(self):
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolError("control connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, cmd, **args):
        """Sends one command and returns the whole reply object."""
        request_id = next(self._ids)
        message = dict(args, id=request_id, cmd=cmd)
        if self.token:
            message["token"] = self.token
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._line()
            if "event" in reply:
                self._events.append(reply)
            elif reply.get("id") in (request_id, None):
                return reply

    def call(self, cmd, **args):
        """The result of a command; raises ControlError on ok:false."""
        reply = self.request(cmd, **args)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise ControlError(error.get("code", "?"), error.get("message", ""))
        return reply.get("result")

    def events(self, interval_ms=None):
        """Yields pushed events forever (subscribing first when interval_ms is given)."""
        if interval_ms is not None:
            self.call("subscribe", interval_ms=interval_ms)
        while True:
            if self._events:
                yield self._events.pop(0)
                continue
            reply = self._line()
            if "event" in reply:
                yield reply
