variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "us-east-1"
}

variable "prefix" {
  description = "Prefix of every resource name (<prefix>-jobs, <prefix>-artifacts, ...). Lowercase, it also names the bucket."
  type        = string
  default     = "kiln"
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{1,30}$", var.prefix))
    error_message = "prefix must be 2 to 31 of a-z, 0-9 and '-'."
  }
}

variable "deletion_protection" {
  description = "Protect the DynamoDB tables from deletion (set false for a throwaway deployment that `terraform destroy` should remove)."
  type        = bool
  default     = true
}

variable "lambda_architecture" {
  description = "CPU architecture of the Lambda functions: arm64 (cheaper per GB-second) or x86_64. Package the zips for the same one (terraform/package.sh --arch ...)."
  type        = string
  default     = "arm64"
  validation {
    condition     = contains(["arm64", "x86_64"], var.lambda_architecture)
    error_message = "lambda_architecture must be arm64 or x86_64."
  }
}

variable "lambda_package_dir" {
  description = "Folder holding <architecture>/<function>.zip, as terraform/package.sh writes them. Empty: the repository's target/lambda."
  type        = string
  default     = ""
}

variable "function_env" {
  description = "Extra environment per function (function name => { VARIABLE = value }), e.g. { submit-job = { KILN_QUEUED_TTL_SECS = \"7200\" } }; merged over terraform/functions.json."
  type        = map(map(string))
  default     = {}
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the functions', the API's and the runners' logs."
  type        = number
  default     = 30
}

variable "api_throttle_rate_limit" {
  description = "Default steady-state requests per second the HTTP API accepts (every route)."
  type        = number
  default     = 50
}

variable "api_throttle_burst_limit" {
  description = "Default request burst the HTTP API accepts (every route)."
  type        = number
  default     = 100
}

variable "output_retention_days" {
  description = "Days a rendered artifact (jobs/ in the bucket, and its copy with result.json under outbox/) is kept before S3 deletes it."
  type        = number
  default     = 30
}

variable "inbox_retention_days" {
  description = "Days an object dropped under inbox/ is kept before S3 deletes it."
  type        = number
  default     = 7
}

variable "queue_age_alarm_seconds" {
  description = "Alarm when the oldest message of a queue has waited this long."
  type        = number
  default     = 900
}

variable "alarm_email" {
  description = "Address subscribed to the alarm topic (confirm the e-mail AWS sends). Empty: no subscription."
  type        = string
  default     = ""
}

variable "runner_instance_types" {
  description = "GPU instance types the runner group may launch, in order of preference (x86_64 with NVIDIA GPUs; CUDA 13 needs driver 580 or newer). Types with several GPUs (g6.12xlarge: 4, p4d.24xlarge: 8, p5.48xlarge: 8) work and mix: the one runner of an instance serves every GPU (KILN_DEVICE=cuda:all, a session per model and GPU, each job on the least loaded), holding KILN_MAX_IN_FLIGHT jobs per GPU; the group counts its capacity in GPUs (each type weighted by runner_instance_gpus)."
  type        = list(string)
  default     = ["g6.xlarge", "g5.xlarge", "g6e.xlarge"]
}

variable "runner_instance_gpus" {
  description = "GPUs of each instance type: the type's weight in the runner group, whose sizes, bounds and backlog target count GPUs. Every type of runner_instance_types must be here."
  type        = map(number)
  default = {
    "g5.xlarge"    = 1, "g5.2xlarge" = 1, "g5.4xlarge" = 1, "g5.8xlarge" = 1, "g5.16xlarge" = 1,
    "g5.12xlarge"  = 4, "g5.24xlarge" = 4, "g5.48xlarge" = 8,
    "g6.xlarge"    = 1, "g6.2xlarge" = 1, "g6.4xlarge" = 1, "g6.8xlarge" = 1, "g6.16xlarge" = 1,
    "g6.12xlarge"  = 4, "g6.24xlarge" = 4, "g6.48xlarge" = 8,
    "g6e.xlarge"   = 1, "g6e.2xlarge" = 1, "g6e.4xlarge" = 1, "g6e.8xlarge" = 1, "g6e.16xlarge" = 1,
    "g6e.12xlarge" = 4, "g6e.24xlarge" = 4, "g6e.48xlarge" = 8,
    "p4d.24xlarge" = 8, "p4de.24xlarge" = 8,
    "p5.48xlarge"  = 8, "p5e.48xlarge" = 8, "p5en.48xlarge" = 8,
  }
}

variable "runner_ami_ssm_parameter" {
  description = "SSM parameter holding the runner AMI id: an x86_64 AMI with the NVIDIA driver, Docker, the NVIDIA container toolkit and the AWS CLI."
  type        = string
  default     = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id"
}

variable "runner_image_tag" {
  description = "Tag of the gpu-runner image in the ECR repository (tags are immutable: push a new tag and apply to roll the runners). Empty: no image pushed yet, the runner group stays at zero instances."
  type        = string
  default     = ""
}

variable "runner_min_gpus" {
  description = "Fewest runner GPUs (instances weighted by runner_instance_gpus); 0 lets the group scale to zero when the queue is empty."
  type        = number
  default     = 0
}

variable "runner_max_gpus" {
  description = "Most runner GPUs (instances weighted by runner_instance_gpus). The group may overshoot by one instance's GPUs less one, as Auto Scaling does with weights."
  type        = number
  default     = 4
}

variable "runner_backlog_per_gpu" {
  description = "Target of the scaling policy: queued jobs of normal and high priority per in-service GPU (low-priority ones never scale out). About KILN_MAX_IN_FLIGHT (jobs held per GPU) keeps every GPU full without a long wait."
  type        = number
  default     = 4
}

variable "runner_volume_gb" {
  description = "Root volume of a runner instance, in GiB (the AMI, the image and its models)."
  type        = number
  default     = 100
}

variable "runner_subnet_ids" {
  description = "Subnets of the runner instances. Empty: every subnet of the default VPC."
  type        = list(string)
  default     = []
}

variable "runner_assign_public_ip" {
  description = "Give runner instances a public address: needed in subnets without a NAT gateway or VPC endpoints (the default VPC). They accept no inbound traffic either way."
  type        = bool
  default     = true
}

variable "runner_env" {
  description = "Extra runner environment (VARIABLE => value), merged over terraform/functions.json's runner env."
  type        = map(string)
  default     = {}
}

variable "reserve_api_concurrency" {
  description = "Reserve each API function's concurrency (functions.json `reserved_concurrency`, 155 in all) so no other function can take it. Needs an account concurrency limit well above that (the default 1,000); turn off on a new account still limited to 10."
  type        = bool
  default     = true
}

variable "served_models" {
  description = "The model packages in the runner image (their manifest names). The runner publishes their manifests at startup and may write only these items of the models table."
  type        = list(string)
  default     = ["kiln-demo", "kiln-tiny-motion", "kiln-tiny-sd"]
}

variable "edge_key_requests_per_minute" {
  description = "Requests one API key may make per minute before the web ACL answers 429 (the per-tenant throttle; AWS WAF's minimum is 10)."
  type        = number
  default     = 600
  validation {
    condition     = var.edge_key_requests_per_minute >= 10 && var.edge_key_requests_per_minute <= 2000000000
    error_message = "edge_key_requests_per_minute must be between 10 and 2,000,000,000 (AWS WAF's bounds)."
  }
}

variable "edge_ip_requests_per_minute" {
  description = "Requests one source address may make per minute, keyed or not, before the web ACL answers 429 (AWS WAF's minimum is 10)."
  type        = number
  default     = 1200
  validation {
    condition     = var.edge_ip_requests_per_minute >= 10 && var.edge_ip_requests_per_minute <= 2000000000
    error_message = "edge_ip_requests_per_minute must be between 10 and 2,000,000,000 (AWS WAF's bounds)."
  }
}

variable "manage_api_gateway_account" {
  description = "Set API Gateway's account-wide CloudWatch role (REST APIs log through it). False where another stack of this account and region already sets it."
  type        = bool
  default     = true
}
