"""Locust users for bench/serve_load.py: each sends POST /caption with one photo, again and again.

Environment: SERVE_PHOTOS (a folder of .jpg), SERVE_BAD_EVERY (every Nth request is a bad one,
0: none), SERVE_TALLY (a JSON file written at the end: statuses of good and of bad requests).
Bad requests cycle through the kinds the server must refuse with a 4xx: not an image, a truncated
JPEG, a wrong content type, a missing field, bad JSON, too many pixels (a 9000 x 9000 PNG).
"""
import io
import itertools
import json
import os
import threading

from locust import HttpUser, events, task

PHOTOS = sorted(os.path.join(os.environ["SERVE_PHOTOS"], f) for f in os.listdir(os.environ["SERVE_PHOTOS"])
                if f.endswith(".jpg"))
DATA = [open(p, "rb").read() for p in PHOTOS]
BAD_EVERY = int(os.environ.get("SERVE_BAD_EVERY", "0"))
COUNTER = itertools.count()
TALLY, LOCK = {"good": {}, "bad": {}}, threading.Lock()


def huge_png():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, format="PNG")  # 81 Mpx in about 80 KB
    return buf.getvalue()


BAD = [("not-an-image", dict(files={"image": ("notes.txt", b"just some text")})),
       ("truncated", dict(files={"image": ("cut.jpg", DATA[0][: len(DATA[0]) // 3])})),
       ("content-type", dict(data=b"hello", headers={"Content-Type": "text/plain"})),
       ("missing-field", dict(files={"picture": ("a.jpg", DATA[0])})),
       ("bad-json", dict(data=b"{nope", headers={"Content-Type": "application/json"})),
       ("too-many-pixels", dict(files={"image": ("huge.png", huge_png())}))]


def tally(kind, status):
    with LOCK:
        TALLY[kind][str(status)] = TALLY[kind].get(str(status), 0) + 1


class Client(HttpUser):
    wait_time = staticmethod(lambda: 0)  # a closed loop: each user sends its next request on the answer

    @task
    def caption(self):
        n = next(COUNTER)
        if BAD_EVERY and n % BAD_EVERY == BAD_EVERY - 1:
            name, request = BAD[(n // BAD_EVERY) % len(BAD)]
            with self.client.post("/caption", name=f"bad {name}", catch_response=True, **request) as r:
                tally("bad", r.status_code)
                r.success() if 400 <= r.status_code < 500 else r.failure(f"bad request answered {r.status_code}")
            return
        files = {"image": (f"{n % len(DATA)}.jpg", DATA[n % len(DATA)], "image/jpeg")}
        with self.client.post("/caption", name="good", files=files, catch_response=True) as r:
            tally("good", r.status_code)
            r.success() if r.status_code == 200 else r.failure(f"answered {r.status_code}")


@events.test_stop.add_listener
def write_tally(**_):
    if os.environ.get("SERVE_TALLY"):
        with open(os.environ["SERVE_TALLY"], "w") as f:
            json.dump(TALLY, f)
