"""The object-store users' bucket policies (k8s/base/minio-policies/), evaluated for real.

MinIO speaks the AWS policy language; moto's S3 with IAM enforcement evaluates the same JSON documents.
Each consumer's user gets its policy, then does what it does in production (and what it must not):
the MLflow server on s3://mlflow, the pipeline reading data versions and writing its multi-node
scratch, the DVC writer pushing data versions. The structural checks (ARNs, the bootstrap Job) are in
tests/test_k8s.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import moto
import pytest
from botocore.exceptions import ClientError
from moto.core.authorization import disable_iam_authentication, enable_iam_authentication

POLICIES = Path(__file__).resolve().parents[1] / "k8s/base/minio-policies"
CONSUMERS = ("mlflow", "pipeline", "dvc-writer")
DATA = "files/md5/0d/89fd08f02f504ebb9c11e51c67cea8"  # a DVC 3 object key
SCRATCH = "runs/5f2c1d0e/ppo/output/model.safetensors"
ARTIFACT = "1/0a1b/artifacts/model/model.safetensors"

#: (consumer, operation, bucket, key) -> allowed
CASES = [
    ("mlflow", "put", "mlflow", ARTIFACT, True),
    ("mlflow", "get", "mlflow", ARTIFACT, True),
    ("mlflow", "list", "mlflow", "1/", True),
    ("mlflow", "delete", "mlflow", ARTIFACT, True),  # mlflow gc
    ("mlflow", "get", "dvc", DATA, False),
    ("mlflow", "put", "dvc", DATA, False),
    ("pipeline", "get", "dvc", DATA, True),  # prepare: the data version by hash
    ("pipeline", "list", "dvc", "runs/", True),
    ("pipeline", "put", "dvc", SCRATCH, True),  # multi-node launcher/job: scratch
    ("pipeline", "get", "dvc", SCRATCH, True),
    ("pipeline", "delete", "dvc", SCRATCH, True),
    ("pipeline", "put", "dvc", DATA, False),  # cannot rewrite a data version
    ("pipeline", "delete", "dvc", DATA, False),
    ("pipeline", "get", "mlflow", ARTIFACT, False),
    ("pipeline", "put", "mlflow", ARTIFACT, False),  # cannot forge model artifacts
    ("dvc-writer", "put", "dvc", DATA, True),  # dvc push
    ("dvc-writer", "get", "dvc", DATA, True),  # dvc pull / status
    ("dvc-writer", "list", "dvc", "files/md5/", True),
    ("dvc-writer", "delete", "dvc", DATA, False),  # dvc gc stays with the operator
    ("dvc-writer", "put", "dvc", SCRATCH, False),
    ("dvc-writer", "get", "mlflow", ARTIFACT, False),
]


@pytest.fixture(scope="module")
def clients():
    """A boto3 S3 client per consumer, logged in as its own user with its own policy."""
    with moto.mock_aws(), disable_iam_authentication():
        iam = boto3.client("iam", region_name="us-east-1")
        s3 = boto3.client("s3", region_name="us-east-1")
        for bucket in ("mlflow", "dvc"):
            s3.create_bucket(Bucket=bucket)
        out = {}
        for consumer in CONSUMERS:
            user = f"rlhf-{consumer}"
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=user,
                                PolicyDocument=(POLICIES / f"{user}.json").read_text())
            key = iam.create_access_key(UserName=user)["AccessKey"]
            out[consumer] = boto3.client("s3", region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                                         aws_secret_access_key=key["SecretAccessKey"])
        with enable_iam_authentication():
            yield out


def attempt(client, op: str, bucket: str, key: str) -> bool:
    try:
        if op == "put":
            client.put_object(Bucket=bucket, Key=key, Body=b"x")
        elif op == "get":
            client.get_object(Bucket=bucket, Key=key)
        elif op == "list":
            client.list_objects_v2(Bucket=bucket, Prefix=key)
        elif op == "delete":
            client.delete_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response["Error"]["Code"] in {"AccessDenied", "403"}:
            return False
        if e.response["Error"]["Code"] in {"NoSuchKey", "404"}:
            return True  # authorised, the object is just not there
        raise
    return True


def test_each_user_can_do_its_job_and_nothing_else(clients):
    # objects to read and delete, written by the users allowed to write them
    assert attempt(clients["dvc-writer"], "put", "dvc", DATA)
    assert attempt(clients["mlflow"], "put", "mlflow", ARTIFACT)
    results = {}
    for consumer, op, bucket, key, want in CASES:
        if op == "delete" and want:  # keep the object for the reads after it
            continue
        results[(consumer, op, bucket, key)] = (attempt(clients[consumer], op, bucket, key), want)
    for consumer, op, bucket, key, want in CASES:
        if op == "delete" and want:
            results[(consumer, op, bucket, key)] = (attempt(clients[consumer], op, bucket, key), want)
    wrong = {k: got for k, (got, want) in results.items() if got != want}
    assert not wrong, "allowed (True) / denied (False) against the policy: " + json.dumps(
        {" ".join(k): v for k, v in wrong.items()}, indent=1)
