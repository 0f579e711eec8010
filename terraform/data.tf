# The data layer: tables, queues and the artifacts bucket, shaped by stack.json. The local
# stack (functions/aws/src/provision.rs) creates the same resources from the same file.

locals {
  # Tables whose stream a function reads (functions.json triggers of type dynamodb_stream).
  streamed_tables = toset([for name, f in local.functions : f.trigger.table if f.trigger.type == "dynamodb_stream"])
  # The function consuming each queue (by queue key, `jobs-dlq` for a dead-letter queue).
  queue_consumers = { for name, f in local.functions : f.trigger.queue => name if f.trigger.type == "sqs" }
  # SQS requires a consumer function's timeout within the queue's visibility timeout; AWS
  # advises six times it, so a batch retried by the function's own retries is not redelivered.
  consumer_visibility = { for queue, name in local.queue_consumers : queue => 6 * local.functions[name].timeout_s }
}

resource "aws_dynamodb_table" "table" {
  #checkov:skip=CKV_AWS_119:Encrypted at rest with the AWS-owned key; a customer managed key adds a per-request KMS cost and a key policy to run, with no reader outside these roles to keep out.
  for_each                    = local.stack.tables
  name                        = "${var.prefix}-${each.key}"
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = each.value.hash_key
  deletion_protection_enabled = var.deletion_protection

  # stack.json's `stream` (a view type) turns on the table's stream, as the local stack does;
  # a function reading a table's stream (a dynamodb_stream trigger) needs one too.
  stream_enabled   = try(each.value.stream, null) != null || contains(local.streamed_tables, each.key)
  stream_view_type = try(each.value.stream, null) != null || contains(local.streamed_tables, each.key) ? coalesce(try(each.value.stream, null), "NEW_AND_OLD_IMAGES") : null

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

  server_side_encryption {
    enabled = true
  }
}

resource "aws_sqs_queue" "dead_letter" {
  for_each                   = local.stack.queues
  name                       = "${var.prefix}-${each.key}-dlq"
  message_retention_seconds  = each.value.dead_letter.message_retention_seconds
  visibility_timeout_seconds = lookup(local.consumer_visibility, "${each.key}-dlq", 30)
  sqs_managed_sse_enabled    = true
  # Only its own queue may move messages here (named, not referenced: that queue refers to this).
  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = ["${local.arn.queue}${each.key}"]
  })
}

resource "aws_sqs_queue" "queue" {
  for_each = local.stack.queues
  name     = "${var.prefix}-${each.key}"
  # Receivers that pass no visibility timeout get this one; the runner passes its lease
  # (KILN_LEASE_SECS) and renews it every KILN_HEARTBEAT_SECS (tests/terraform.rs holds the
  # lease within it); a consumer function gets six times its timeout.
  visibility_timeout_seconds = max(each.value.visibility_timeout_seconds, lookup(local.consumer_visibility, each.key, 0))
  receive_wait_time_seconds  = each.value.receive_wait_time_seconds
  message_retention_seconds  = each.value.message_retention_seconds
  sqs_managed_sse_enabled    = true
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dead_letter[each.key].arn
    maxReceiveCount     = each.value.dead_letter.max_receive_count
  })
}

resource "aws_s3_bucket" "bucket" {
  #checkov:skip=CKV_AWS_18:Objects are read through presigned URLs the functions sign per job; CloudTrail data events are the audit trail where one is wanted, without a second bucket of logs.
  #checkov:skip=CKV_AWS_21:Artifacts are derived data written once per job (a redelivery rewrites the same bytes) and expire; versions would only keep copies.
  #checkov:skip=CKV_AWS_144:Artifacts live as long as output_retention_days in one region; a lost region loses renders that can be submitted again.
  #checkov:skip=CKV_AWS_145:SSE-S3 (AES-256); SSE-KMS would make every presigned download a KMS call and need kms:Decrypt in every presigning role.
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

resource "aws_s3_bucket_ownership_controls" "bucket" {
  for_each = aws_s3_bucket.bucket
  bucket   = each.value.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "bucket" {
  for_each = aws_s3_bucket.bucket
  bucket   = each.value.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "bucket" {
  for_each = aws_s3_bucket.bucket
  bucket   = each.value.id

  rule {
    id     = "expire-outputs"
    status = "Enabled"
    filter {
      prefix = "jobs/"
    }
    expiration {
      days = var.output_retention_days
    }
  }

  # What job-events copies out for an inbox upload (the artifact, result.json, error.json).
  rule {
    id     = "expire-outbox"
    status = "Enabled"
    filter {
      prefix = "outbox/"
    }
    expiration {
      days = var.output_retention_days
    }
  }

  rule {
    id     = "expire-inbox"
    status = "Enabled"
    filter {
      prefix = "inbox/"
    }
    expiration {
      days = var.inbox_retention_days
    }
  }

  # Init images uploaded through POST /v1/uploads: inputs, kept as long as inbox specs.
  rule {
    id     = "expire-images"
    status = "Enabled"
    filter {
      prefix = "images/"
    }
    expiration {
      days = var.inbox_retention_days
    }
  }

  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

# Requests over plain HTTP are refused.
resource "aws_s3_bucket_policy" "bucket" {
  for_each = aws_s3_bucket.bucket
  bucket   = each.value.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "TlsOnly"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Resource  = [each.value.arn, "${each.value.arn}/*"]
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    }]
  })
  depends_on = [aws_s3_bucket_public_access_block.bucket]
}
