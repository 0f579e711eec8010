#!/usr/bin/env bash
# terraform apply of this directory against a local moto server: every resource is created
# through the AWS provider's real calls, with no AWS account. A check for a machine that has
# terraform and the AWS provider (CI has neither, and neither can be downloaded there).
#
#   terraform/moto-apply.sh            # needs `terraform` on PATH; honours TF_CLI_CONFIG_FILE
#                                      # (e.g. a filesystem_mirror for the provider)
#
# What differs from a real apply, on a copy in a temporary directory:
# - the provider points every service at moto (override.tf) with test credentials;
# - the Lambda zips are one-line placeholders (moto does not run them);
# - the GPU AMI comes from an SSM parameter this script puts (moto has no DLAMI parameters);
# - the DLQs' redrive_allow_policy is left out: moto never reports it back, so the provider
#   would wait for it for ever.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
command -v terraform >/dev/null || { echo "terraform is not on PATH" >&2; exit 2; }
moto="$root/.venv/bin/moto_server"
python="$root/.venv/bin/python"
[ -x "$moto" ] || { echo "no $moto: run \`cargo run -p kiln-local -- test\` once (it makes the venv)" >&2; exit 2; }

work="$(mktemp -d)"
port="$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
MOTO_IAM_LOAD_MANAGED_POLICIES=true "$moto" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null; rm -rf "$work"' EXIT
endpoint="http://127.0.0.1:$port"
for _ in $(seq 50); do curl -sf "$endpoint/moto-api/" >/dev/null 2>&1 && break; sleep 0.2; done

cp -r "$here" "$work/terraform"
rm -rf "$work/terraform/.terraform" "$work/terraform/.terraform.lock.hcl" "$work/terraform"/terraform.tfstate*
services="apigateway wafv2 autoscaling cloudwatch cloudwatchlogs dynamodb ec2 ecr events iam lambda s3 sns sqs ssm sts"
{
  echo 'provider "aws" {'
  echo '  region                      = "us-east-1"'
  echo '  access_key                  = "test"'
  echo '  secret_key                  = "test"'
  echo '  skip_credentials_validation = true'
  echo '  skip_requesting_account_id  = true'
  echo '  skip_metadata_api_check     = true'
  echo '  s3_use_path_style           = true'
  echo '  endpoints {'
  for service in $services; do echo "    $service = \"$endpoint\""; done
  echo '  }'
  echo '}'
  echo 'resource "aws_sqs_queue" "dead_letter" {'
  echo '  redrive_allow_policy = null'
  echo '}'
} >"$work/terraform/override.tf"

architecture=arm64
mkdir -p "$work/zips/$architecture"
echo placeholder >"$work/bootstrap"
for function in $("$python" -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["functions"]))' "$here/functions.json"); do
  (cd "$work" && "$python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1], "w").write("bootstrap")' "zips/$architecture/$function.zip")
done
"$python" - "$endpoint" <<'EOF'
import sys, boto3
endpoint = sys.argv[1]
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
image = boto3.client("ec2", **kw).describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
boto3.client("ssm", **kw).put_parameter(Name="/kiln-moto/gpu-ami", Value=image, Type="String")
EOF

cd "$work/terraform"
vars=(-var "lambda_package_dir=$work/zips" -var "lambda_architecture=$architecture" -var prefix=kilnmoto
  -var runner_ami_ssm_parameter=/kiln-moto/gpu-ami)
terraform init -input=false -backend=false >/dev/null
terraform apply -input=false -auto-approve -no-color "${vars[@]}" | grep -E '^(Apply complete|Error)' || true
resources="$(terraform state list | wc -l)"
echo "resources in state: $resources"
for output in api_url queue_urls tables; do echo "$output = $(terraform output -no-color -json "$output")"; done
[ "$resources" -gt 100 ]
