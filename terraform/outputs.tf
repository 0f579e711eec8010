output "api_url" {
  description = "Base URL of the API, its stage included (append /v1/jobs, /v1/models)."
  value       = aws_api_gateway_stage.api.invoke_url
}

output "artifacts_bucket" {
  description = "S3 bucket of artifacts (jobs/) and the inbox (inbox/)."
  value       = aws_s3_bucket.bucket["artifacts"].bucket
}

output "tables" {
  description = "DynamoDB table names (KILN_*_TABLE for kiln-admin)."
  value       = { for k, t in aws_dynamodb_table.table : k => t.name }
}

output "queue_urls" {
  description = "SQS queue URLs."
  value       = { for k, q in aws_sqs_queue.queue : k => q.url }
}

output "dead_letter_queue_urls" {
  description = "SQS dead-letter queue URLs."
  value       = { for k, q in aws_sqs_queue.dead_letter : k => q.url }
}

output "dashboard_url" {
  description = "The CloudWatch dashboard of the golden signals."
  value       = "https://${local.region}.console.aws.amazon.com/cloudwatch/home?region=${local.region}#dashboards/dashboard/${aws_cloudwatch_dashboard.golden_signals.dashboard_name}"
}

output "functions" {
  description = "Lambda function names, by binary."
  value       = { for k, f in aws_lambda_function.function : k => f.function_name }
}

output "runner_repository_url" {
  description = "ECR repository of the gpu-runner image: push <url>:<tag>, then apply with -var runner_image_tag=<tag>."
  value       = aws_ecr_repository.runner.repository_url
}

output "runner_group" {
  description = "Auto Scaling group of the GPU runners."
  value       = aws_autoscaling_group.runner.name
}

output "alarm_topic_arn" {
  description = "SNS topic the alarms notify."
  value       = aws_sns_topic.alarms.arn
}

output "web_acl_arn" {
  description = "The web ACL on the API stage (keyless requests, per-address and per-key rates)."
  value       = aws_wafv2_web_acl.api.arn
}
