"""How moto's memory grows with the jobs table (RELIABILITY.md, "What limits the long runs").

Starts nothing: give it a running moto's URL and process id. It writes what a job's life writes
(one two-item transaction, then five revisions of a 1.5 KB item, on a table with a
NEW_AND_OLD_IMAGES stream) 600 times and prints moto's resident memory and the time every 100.

    .venv/bin/python functions/local/moto_server.py -p 5996 &
    .venv/bin/python functions/local/moto_memory_check.py http://127.0.0.1:5996 $!
"""

import sys
import time

import boto3

url, pid = sys.argv[1], int(sys.argv[2])
dynamodb = boto3.client(
    "dynamodb", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
)
dynamodb.create_table(
    TableName="jobs",
    KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
    AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
    BillingMode="PAY_PER_REQUEST",
    StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
)
dynamodb.create_table(
    TableName="requests",
    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
    BillingMode="PAY_PER_REQUEST",
)


def resident_mb():
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) // 1024


blob = "x" * 1500
started = time.time()
for job in range(600):
    dynamodb.transact_write_items(
        TransactItems=[
            {"Put": {"TableName": "jobs", "Item": {"id": {"S": f"j{job}"}, "blob": {"S": blob}},
                     "ConditionExpression": "attribute_not_exists(id)"}},
            {"Put": {"TableName": "requests", "Item": {"pk": {"S": f"c{job}"}},
                     "ConditionExpression": "attribute_not_exists(pk)"}},
        ]
    )
    for revision in range(5):
        item = {"id": {"S": f"j{job}"}, "blob": {"S": blob}, "revision": {"N": str(revision)}}
        dynamodb.put_item(TableName="jobs", Item=item)
    if job % 100 == 99:
        print(f"{job + 1} jobs: moto {resident_mb()} MB resident, {time.time() - started:.1f} s", flush=True)
