"""Tests of moeclient against fake servers (the daemon is tested elsewhere).
Run: python3 -m unittest discover -s protocol/python -v"""
import json
import os
import socket
import socketserver
import struct
import tempfile
import threading
import unittest

import numpy as np

import moeclient as mc


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class FakeDataHandler(socketserver.BaseRequestHandler):
    """FORWARD -> RESULT of 2*x (times sum of routed weights); layer 99 ->
    ERROR bad_layer; layer 7 -> held, answered in reverse once 3 are held;
    PING -> PONG. Decodes with its own struct format, not moeclient's."""

    def handle(self):
        held = []
        while True:
            head = _recv_exact(self.request, 48)
            if head is None:
                return
            (magic, version, type_, rid, layer, n_tokens, hidden, dtype, flags, top_k, status,
             reserved, payload_len) = struct.unpack("<4sHHQIIIBBHIIQ", head)
            payload = _recv_exact(self.request, payload_len) if payload_len else b""
            self.server.seen.append((type_, rid, layer, dtype, flags, top_k))
            if magic != b"MOED":
                text = b"bad magic"
                self.request.sendall(struct.pack("<4sHHQIIIBBHIIQ", b"MOED", 1, 3, 0, 0, 0, 0, 0,
                                                 0, 0, 9, 0, len(text)) + text)
                return
            if type_ == 4:
                self.request.sendall(struct.pack("<4sHHQIIIBBHIIQ", b"MOED", 1, 5, rid, 0, 0, 0,
                                                 0, 0, 0, 0, 0, payload_len) + payload)
            elif layer == 99:
                text = "layer 99 is not served".encode()
                self.request.sendall(struct.pack("<4sHHQIIIBBHIIQ", b"MOED", 1, 3, rid, 99, 0, 0,
                                                 0, 0, 0, 1, 0, len(text)) + text)
            else:
                held.append((rid, layer, n_tokens, hidden, dtype, flags, top_k, payload))
                if layer == 7 and len(held) < 3:
                    continue
                for item in reversed(held):
                    self.request.sendall(self.answer(*item))
                held = []

    @staticmethod
    def answer(rid, layer, n_tokens, hidden, dtype, flags, top_k, payload):
        n = n_tokens * hidden
        if dtype == 1:
            x = np.frombuffer(payload[:4 * n], "<f4").astype(np.float64)
        elif dtype == 3:
            x = np.frombuffer(payload[:2 * n], "<f2").astype(np.float64)
        else:
            x = (np.frombuffer(payload[:2 * n], "<u2").astype(np.uint32) << 16).view(
                np.float32).astype(np.float64)
        scale = 2.0
        if flags & 1:
            off = (4 if dtype == 1 else 2) * n + 4 * n_tokens * top_k
            scale *= float(np.frombuffer(payload[off:off + 4 * n_tokens * top_k], "<f4").sum())
        y = (x * scale).astype(np.float32)
        if dtype == 1:
            out = y.astype("<f4").tobytes()
        elif dtype == 3:
            out = y.astype("<f2").tobytes()
        else:
            out = mc.f32_to_bf16(y).astype("<u2").tobytes()
        return struct.pack("<4sHHQIIIBBHIIQ", b"MOED", 1, 2, rid, layer, n_tokens, hidden, dtype,
                           0, 0, 0, 0, len(out)) + out


class FakeControlHandler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            req = json.loads(line)
            self.server.requests.append(req)
            cmd, rid = req.get("cmd"), req.get("id")
            if cmd == "health":
                reply = {"id": rid, "ok": True, "result": {"status": "ok", "step": 5}}
            elif cmd == "subscribe":
                reply = {"id": rid, "ok": True, "result": {"subscribed": True,
                                                           "interval_ms": req["interval_ms"]}}
                self.wfile.write((json.dumps(reply) + "\n").encode())
                for step in range(3):
                    self.wfile.write((json.dumps({"event": "stats",
                                                  "result": {"step": step}}) + "\n").encode())
                continue
            elif cmd == "drain" and req.get("token") != "s3cret":
                reply = {"id": rid, "ok": False,
                         "error": {"code": "unauthorized", "message": "token required"}}
            elif cmd == "drain":
                reply = {"id": rid, "ok": True, "result": {"draining": True, "queued_requests": 0}}
            else:
                reply = {"id": rid, "ok": False,
                         "error": {"code": "unknown_command", "message": cmd}}
            # an unsolicited event before the reply must not be taken for it
            self.wfile.write(b'{"event": "stats", "result": {"step": -1}}\n')
            self.wfile.write((json.dumps(reply) + "\n").encode())


class Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class ThreadedUnix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def start(server):
    server.seen, server.requests = [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class HeaderTest(unittest.TestCase):
    def test_layout_matches_table(self):
        b = mc.encode_header(mc.FORWARD, request_id=0x0102030405060708, layer=0xA1A2A3A4,
                             n_tokens=3, hidden=5, dtype=2, flags=1, top_k=2, status=9,
                             payload_len=78)
        self.assertEqual(len(b), 48)
        self.assertEqual(b[0:4], b"MOED")
        self.assertEqual(int.from_bytes(b[4:6], "little"), 1)
        self.assertEqual(int.from_bytes(b[6:8], "little"), 1)
        self.assertEqual(b[8:16], bytes([8, 7, 6, 5, 4, 3, 2, 1]))
        self.assertEqual(int.from_bytes(b[16:20], "little"), 0xA1A2A3A4)
        self.assertEqual(int.from_bytes(b[20:24], "little"), 3)
        self.assertEqual(int.from_bytes(b[24:28], "little"), 5)
        self.assertEqual((b[28], b[29]), (2, 1))
        self.assertEqual(int.from_bytes(b[30:32], "little"), 2)
        self.assertEqual(int.from_bytes(b[32:36], "little"), 9)
        self.assertEqual(b[36:40], b"\0\0\0\0")
        self.assertEqual(int.from_bytes(b[40:48], "little"), 78)
        h = mc.decode_header(b)
        self.assertEqual((h["request_id"], h["layer"], h["top_k"], h["payload_len"]),
                         (0x0102030405060708, 0xA1A2A3A4, 2, 78))

    def test_bad_headers(self):
        good = mc.encode_header(mc.PING)
        with self.assertRaises(mc.ProtocolError):
            mc.decode_header(b"XXXX" + good[4:])
        with self.assertRaises(mc.ProtocolError):
            mc.decode_header(mc.encode_header(mc.PING, version=2))
        with self.assertRaises(mc.ProtocolError):
            mc.decode_header(mc.encode_header(9))


class ConversionTest(unittest.TestCase):
    def test_bf16_known_values_and_ties(self):
        bits = np.array([0x3F800000, 0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x00018000,
                         0xFF800000, 0x3DCCCCCD], dtype=np.uint32)
        got = mc.f32_to_bf16(bits.view(np.float32))
        self.assertEqual(got.tolist(), [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x7F80, 0x0002, 0xFF80,
                                        0x3DCD])
        nan = mc.f32_to_bf16(np.array([np.nan, 0], dtype=np.float32).view(np.uint32).astype(
            np.uint32).view(np.float32))
        self.assertTrue(np.isnan(mc.bf16_to_f32(nan[:1]))[0])
        snan = mc.f32_to_bf16(np.array([0x7F800001], dtype=np.uint32).view(np.float32))
        self.assertTrue(np.isnan(mc.bf16_to_f32(snan))[0])

    def test_bf16_is_nearest_even_on_random_values(self):
        seed = int.from_bytes(os.urandom(4), "little")
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal(200000) * 10.0 ** rng.integers(-30, 30, 200000)).astype(np.float32)
        b = mc.f32_to_bf16(x)
        # independent reference: nearest of the two bf16 values around x (truncation and
        # truncation + 1 ulp), in float64, ties to the even code
        lo = (x.view(np.uint32) >> 16).astype(np.uint16)
        hi = lo + np.uint16(1)
        vlo = mc.bf16_to_f32(lo).astype(np.float64)
        vhi = mc.bf16_to_f32(hi).astype(np.float64)
        dlo, dhi = np.abs(x - vlo), np.abs(vhi - x)
        want = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
        bad = np.nonzero(want != b)[0]
        self.assertEqual(len(bad), 0, "seed %d: %r" % (seed, x[bad[:5]]))
        self.assertTrue(np.array_equal(mc.bf16_to_f32(b), (b.astype(np.uint32) << 16).view(
            np.float32)))

    def test_f16_matches_numpy(self):
        x = np.array([1.0, 65519.0, 65520.0, 2.0 ** -25, 3 * 2.0 ** -25, 0.1, -np.inf],
                     dtype=np.float32)
        codes = mc._encode_values(x, 3)
        self.assertEqual(np.frombuffer(codes, "<u2").tolist(),
                         [0x3C00, 0x7BFF, 0x7C00, 0x0000, 0x0002, 0x2E66, 0xFC00])
        back = mc._decode_values(codes, 3, (7,))
        self.assertEqual(back.dtype, np.float32)
        self.assertEqual(back[0], 1.0)
        self.assertEqual(back[4], np.float32(2.0 ** -23))


class DataPlaneTest(unittest.TestCase):
    def setUp(self):
        self.server = start(Threaded(("127.0.0.1", 0), FakeDataHandler))
        self.port = self.server.server_address[1]

    def tearDown(self):
        self.server.shutdown()
        self.server.server_close()

    def test_forward_each_dtype(self):
        seed = int.from_bytes(os.urandom(4), "little")
        x = np.random.default_rng(seed).uniform(-2, 2, (5, 33)).astype(np.float32)
        with mc.Client("127.0.0.1:%d" % self.port) as c:
            y = c.forward(0, x)
            self.assertEqual(y.dtype, np.float32)
            self.assertTrue(np.array_equal(y, 2 * x), "seed %d" % seed)
            y = c.forward(0, x, dtype="f16")
            want = (2 * x.astype(np.float16).astype(np.float32)).astype(np.float16).astype(
                np.float32)
            self.assertTrue(np.array_equal(y, want), "seed %d" % seed)
            y = c.forward(0, x, dtype="bf16")
            xb = mc.bf16_to_f32(mc.f32_to_bf16(x))
            self.assertTrue(np.array_equal(y, mc.bf16_to_f32(mc.f32_to_bf16(2 * xb))))
            self.assertLess(np.max(np.abs(y - 2 * x) / np.abs(2 * x)), 2 ** -7)

    def test_routed(self):
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        ids = np.array([[0, 1], [2, 3]])
        weights = np.array([[0.25, 0.5], [0.75, 1.0]])
        with mc.Client("127.0.0.1:%d" % self.port) as c:
            y = c.forward(3, x, routed=(ids, weights))
        self.assertTrue(np.array_equal(y, 5 * x))
        self.assertEqual(self.server.seen[-1][4:], (1, 2))

    def test_pipelined_out_of_order(self):
        with mc.Client("127.0.0.1:%d" % self.port) as c:
            xs = {c.submit(7, np.full((1, 4), k, np.float32)): k for k in range(3)}
            order = []
            for _ in range(3):
                rid, y = c.result()
                order.append(rid)
                self.assertTrue(np.array_equal(y, np.full((1, 4), 2 * xs[rid], np.float32)))
            self.assertEqual(order, sorted(xs, reverse=True))
            # asking by id buffers the others
            a = c.submit(7, np.ones((1, 2), np.float32))
            b = c.submit(7, 2 * np.ones((1, 2), np.float32))
            d = c.submit(7, 3 * np.ones((1, 2), np.float32))
            self.assertEqual(c.result(a)[1].tolist(), [[2, 2]])
            self.assertEqual(c.result(d)[1].tolist(), [[6, 6]])
            self.assertEqual(c.result(b)[1].tolist(), [[4, 4]])

    def test_error_frame_and_ping(self):
        with mc.Client("127.0.0.1:%d" % self.port) as c:
            with self.assertRaises(mc.MoedError) as cm:
                c.forward(99, np.ones((1, 4), np.float32))
            self.assertEqual((cm.exception.status, cm.exception.name), (1, "bad_layer"))
            self.assertEqual(cm.exception.message, "layer 99 is not served")
            self.assertGreaterEqual(c.ping(), 0.0)
            self.assertEqual(c.forward(0, np.ones((1, 2), np.float32)).tolist(), [[2, 2]])

    def test_rank_offset_and_bad_frame(self):
        with mc.Client("localhost:%d" % (self.port - 1), rank=1) as c:
            c.send_raw(b"JUNK" + bytes(44))
            with self.assertRaises(mc.MoedError) as cm:
                c.result()
            self.assertEqual(cm.exception.name, "bad_frame")
            with self.assertRaises(mc.ProtocolError):
                c.result()

    def test_unix_rank_substitution(self):
        tmp = tempfile.mkdtemp()
        server = start(ThreadedUnix(os.path.join(tmp, "data-2.sock"), FakeDataHandler))
        try:
            with mc.Client("unix:" + os.path.join(tmp, "data-%r.sock"), rank=2) as c:
                self.assertEqual(c.forward(0, np.ones((1, 3), np.float32)).tolist(), [[2, 2, 2]])
            with self.assertRaises(OSError):
                mc.Client("unix:" + os.path.join(tmp, "data-%r.sock"), rank=3)
        finally:
            server.shutdown()
            server.server_close()


class ControlTest(unittest.TestCase):
    def setUp(self):
        self.server = start(Threaded(("127.0.0.1", 0), FakeControlHandler))
        self.address = "127.0.0.1:%d" % self.server.server_address[1]

    def tearDown(self):
        self.server.shutdown()
        self.server.server_close()

    def test_call_and_errors(self):
        with mc.ControlClient(self.address) as cc:
            self.assertEqual(cc.call("health"), {"status": "ok", "step": 5})
            with self.assertRaises(mc.ControlError) as cm:
                cc.call("drain")
            self.assertEqual(cm.exception.code, "unauthorized")
            with self.assertRaises(mc.ControlError) as cm:
                cc.call("frobnicate", layer=3)
            self.assertEqual(cm.exception.code, "unknown_command")
        self.assertEqual(self.server.requests[0], {"id": 1, "cmd": "health"})
        self.assertEqual(self.server.requests[2]["layer"], 3)
        with mc.ControlClient(self.address, token="s3cret") as cc:
            self.assertEqual(cc.call("drain")["draining"], True)
        self.assertEqual(self.server.requests[-1]["token"], "s3cret")

    def test_events(self):
        with mc.ControlClient(self.address) as cc:
            events = cc.events(interval_ms=250)
            steps = [next(events)["result"]["step"] for _ in range(3)]
        self.assertEqual(steps, [0, 1, 2])
        self.assertEqual(self.server.requests[0]["interval_ms"], 250)


if __name__ == "__main__":
    unittest.main()
