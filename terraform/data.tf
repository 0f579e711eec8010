# The data layer: tables, queues and the artifacts bucket, shaped by stack.json. The local
# stack (functions/aws/src/provision.rs) creates the same resources from the same file.

locals {
  stack = jsondecode(file("${path.module}/stack.json"))
}

resource "aws_dynamodb_table" "table" {
  for_each     = local.stack.tables
  name         = "${var.prefix}-${each.key}"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = each.value.hash_key

  dynamic "attribute" {
    for_each = each.value.attributes
    content {
      name = attribute.key
      type = attribute.value
    }
  }

  dynamic "global_secondary_index" {
    for_each = each.value.indexes
    content {
      name            = global_secondary_index.value.name
      hash_key        = global_secondary_index.value.hash_key
      range_key       = lookup(global_secondary_index.value, "range_key", null)
      projection_type = "ALL"
    }
  }

  dynamic "ttl" {
    for_each = each.value.ttl_attribute == null ? [] : [each.value.ttl_attribute]
    content {
      attribute_name = ttl.value
      enabled        = true
    }
  }

  point_in_time_recovery {
    enabled = true
  }
}

resource "aws_sqs_queue" "dead_letter" {
  for_each                  = local.stack.queues
  name                      = "${var.prefix}-${each.key}-dlq"
  message_retention_seconds = each.value.dead_letter.message_retention_seconds
  sqs_managed_sse_enabled   = true
}

resource "aws_sqs_queue" "queue" {
  for_each                   = local.stack.queues
  name                       = "${var.prefix}-${each.key}"
  visibility_timeout_seconds = each.value.visibility_timeout_seconds
  receive_wait_time_seconds  = each.value.receive_wait_time_seconds
  message_retention_seconds  = each.value.message_retention_seconds
  sqs_managed_sse_enabled    = true
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dead_letter[each.key].arn
    maxReceiveCount     = each.value.dead_letter.max_receive_count
  })
}

resource "aws_s3_bucket" "bucket" {
  for_each = local.stack.buckets
  bucket   = "${var.prefix}-${each.key}"
}

resource "aws_s3_bucket_public_access_block" "bucket" {
  for_each                = aws_s3_bucket.bucket
  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

output "tables" {
  description = "DynamoDB table names."
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

output "artifacts_bucket" {
  description = "S3 bucket of artifacts."
  value       = aws_s3_bucket.bucket["artifacts"].bucket
}
