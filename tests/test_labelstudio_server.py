"""The Label Studio fixture against the real server: a review round trip from import to the JSON export."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from labelstudio_server import ADMIN, REVIEWER

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="characters" toName="image" choice="multiple" showInline="true">
    <Choice value="homer_simpson"/><Choice value="marge_simpson"/><Choice value="nobody"/>
  </Choices>
  <RectangleLabels name="boxes" toName="image">
    <Label value="homer_simpson"/><Label value="marge_simpson"/>
  </RectangleLabels>
</View>"""


def choice(*names: str) -> dict:
    return {"from_name": "characters", "to_name": "image", "type": "choices", "value": {"choices": list(names)}}


def box(name: str, x: float, y: float, width: float, height: float) -> dict:
    value = {"x": x, "y": y, "width": width, "height": height, "rotation": 0, "rectanglelabels": [name]}
    return {"from_name": "boxes", "to_name": "image", "type": "rectanglelabels", "original_width": 64, "original_height": 48, "value": value}


def frame_task(name: str, frame: int, predicted: str, score: float) -> dict:
    data = {"image": f"/data/local-files/?d=images/{name}", "source": "s01e01.mkv", "episode": "s01e01", "frame": frame}
    return {"data": data, "predictions": [{"model_version": "resnet18-v1", "score": score, "result": [choice(predicted)]}]}


@pytest.mark.slow  # installs Label Studio into its own venv on first use (about 1.5 min) and starts it (about 40 s)
def test_a_review_round_trip_comes_back_in_the_json_export(label_studio):
    images = label_studio.document_root / "images"
    project = label_studio.create_project("simpsons review", CONFIG)
    label_studio.serve_local_files(project, "images")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (250, 200, 40)).save(jpeg, format="JPEG")
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_bytes(jpeg.getvalue())
    served = label_studio.request("GET", "/data/local-files/", params={"d": "images/a.jpg"})
    assert served.headers["Content-Type"] == "image/jpeg" and served.content == jpeg.getvalue()

    tasks = [frame_task("a.jpg", 12, "homer_simpson", 0.91), frame_task("b.jpg", 13, "nobody", 0.55), frame_task("c.jpg", 14, "marge_simpson", 0.6)]
    ids = label_studio.import_tasks(project, tasks)
    assert len(ids) == 3
    listed = {t["id"]: t for t in label_studio.tasks(project)}
    assert [listed[i]["data"] for i in ids] == [t["data"] for t in tasks]
    assert [p["model_version"] for i in ids for p in listed[i]["predictions"]] == ["resnet18-v1"] * 3

    annotated = [choice("homer_simpson"), box("homer_simpson", 10, 20, 30, 40)]
    label_studio.annotate(ids[0], annotated)
    label_studio.skip(ids[1])
    label_studio.annotate(ids[2], [choice("marge_simpson")], user=ADMIN)
    label_studio.annotate(ids[2], [choice("homer_simpson", "marge_simpson")], user=REVIEWER)

    exported = {t["id"]: t for t in label_studio.export(project)}
    assert sorted(exported) == sorted(ids)
    assert [exported[i]["data"] for i in ids] == [t["data"] for t in tasks]
    first, skipped, disputed = (exported[i]["annotations"] for i in ids)
    assert [(a["result"], a["was_cancelled"]) for a in first] == [(annotated, False)]
    assert [(a["result"], a["was_cancelled"]) for a in skipped] == [([], True)]
    assert exported[ids[1]]["cancelled_annotations"] == 1
    by_user = {a["completed_by"]: a["result"] for a in disputed}
    assert len(by_user) == 2 and sorted(by_user.values(), key=len) == [[choice("marge_simpson")], [choice("homer_simpson", "marge_simpson")]]
    # The export names predictions by id only; the tasks API has them whole.
    assert all(isinstance(p, int) for i in ids for p in exported[i]["predictions"])
