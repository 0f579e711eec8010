# One Lambda function per entry in functions.json, each with its own role, log group and
# trigger. A new function is a new entry there (and its zip from package.sh); a new kind of
# trigger is a new block here.

locals {
  function_env = {
    for name, f in local.functions : name => merge(
      { for key, value in merge(local.deploy.common_env, f.env) : key => lookup(local.refs, value, value) },
      # One retention: the bucket's lifecycle on jobs/ and what the functions record on jobs.
      { KILN_OUTPUT_RETENTION_SECS = tostring(var.output_retention_days * 86400) },
      lookup(var.function_env, name, {}),
    )
  }

  http_routes = merge([
    for name, f in local.functions : { for route in f.trigger.routes : route => name } if f.trigger.type == "http"
  ]...)
  # Routes that answer without a key (the API document and the playground page): exempt from
  # the edge's keyless rule and API Gateway's header check (api.tf).
  public_routes = toset(flatten([for f in values(local.functions) : try(f.trigger.public, [])]))
  scheduled_functions = { for name, f in local.functions : name => f if f.trigger.type == "schedule" }
  sqs_functions       = { for name, f in local.functions : name => f if f.trigger.type == "sqs" }
  stream_functions    = { for name, f in local.functions : name => f if f.trigger.type == "dynamodb_stream" }
  s3_functions        = { for name, f in local.functions : name => f if f.trigger.type == "s3" }

  # What a trigger needs of the function's role: Lambda polls queues and streams with it.
  trigger_statements = {
    for name, f in local.functions : name => (
      f.trigger.type == "sqs" ? [{
        Effect   = "Allow"
        Action   = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"]
        Resource = ["${local.arn.queue}${f.trigger.queue}"]
      }] :
      f.trigger.type == "dynamodb_stream" ? [{
        Effect   = "Allow"
        Action   = ["dynamodb:DescribeStream", "dynamodb:GetRecords", "dynamodb:GetShardIterator", "dynamodb:ListStreams"]
        Resource = ["${local.arn.table}${f.trigger.table}/stream/*"]
      }] : []
    )
  }

  # Where Lambda sends what it gave up on (a stream batch after its retries, an asynchronous
  # invocation after its retries): it sends with the function's role. `kiln-replay` replays it.
  failure_statements = {
    for name, f in local.functions : name => try(f.trigger.on_failure, null) == null ? [] : [{
      Effect   = "Allow"
      Action   = ["sqs:SendMessage"]
      Resource = ["${local.arn.queue}${f.trigger.on_failure}"]
    }]
  }
  failure_queues = toset([for name, f in local.functions : f.trigger.on_failure if try(f.trigger.on_failure, null) != null])
}

data "aws_iam_policy_document" "lambda_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account]
    }
  }
}

resource "aws_iam_role" "function" {
  for_each           = local.functions
  name               = "${var.prefix}-fn-${each.key}"
  description        = "kiln ${each.key}: ${each.value.description}"
  assume_role_policy = data.aws_iam_policy_document.lambda_assume.json
}

resource "aws_iam_role_policy" "function" {
  for_each = local.functions
  name     = "access"
  role     = aws_iam_role.function[each.key].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(
      local.access_statements[each.key],
      local.trigger_statements[each.key],
      local.failure_statements[each.key],
      [{
        Effect   = "Allow"
        Action   = ["logs:CreateLogStream", "logs:PutLogEvents"]
        Resource = ["${aws_cloudwatch_log_group.function[each.key].arn}:*"]
      }],
    )
  })
}

resource "aws_cloudwatch_log_group" "function" {
  #checkov:skip=CKV_AWS_158:Logs are encrypted by CloudWatch's own key; they hold request metadata and job ids, never keys or prompts' secrets.
  #checkov:skip=CKV_AWS_338:Retention is a variable (log_retention_days, 30 days by default); a year is a compliance choice, not a default.
  for_each          = local.functions
  name              = "/aws/lambda/${var.prefix}-${each.key}"
  retention_in_days = var.log_retention_days
}

resource "aws_lambda_function" "function" {
  #checkov:skip=CKV_AWS_50:The functions emit tracing spans as JSON logs, not X-Ray segments; API latency is on the dashboard from API Gateway and Lambda metrics.
  #checkov:skip=CKV_AWS_115:Reserved concurrency fails on accounts with the default concurrency quota; the API stage's throttling bounds the load instead.
  #checkov:skip=CKV_AWS_116:API functions are invoked synchronously and SQS-triggered ones report per-message failures to their queue (which has its own DLQ); the schedule re-runs every minute.
  #checkov:skip=CKV_AWS_117:The functions reach only DynamoDB, SQS and S3 through their public endpoints; a VPC would add NAT or endpoints and cold-start time for nothing they reach.
  #checkov:skip=CKV_AWS_173:The environment holds resource names and settings, no secrets; the default Lambda key encrypts it at rest.
  #checkov:skip=CKV_AWS_272:Zips are built by terraform/package.sh from this repository; code signing would need a signing profile the project does not run.
  for_each         = local.functions
  function_name    = "${var.prefix}-${each.key}"
  description      = each.value.description
  role             = aws_iam_role.function[each.key].arn
  runtime          = "provided.al2023"
  handler          = "bootstrap"
  architectures    = [var.lambda_architecture]
  filename         = "${local.package_dir}/${var.lambda_architecture}/${each.key}.zip"
  source_code_hash = filebase64sha256("${local.package_dir}/${var.lambda_architecture}/${each.key}.zip")
  memory_size      = each.value.memory_mb
  timeout          = each.value.timeout_s
  # The API's own share of the account's concurrency: a flood of webhook deliveries or inbox
  # uploads cannot take the capacity the API needs.
  reserved_concurrent_executions = var.reserve_api_concurrency ? try(each.value.reserved_concurrency, -1) : -1

  environment {
    variables = local.function_env[each.key]
  }

  lifecycle {
    precondition {
      condition     = alltrue([for value in values(merge(local.deploy.common_env, each.value.env)) : !startswith(value, "@") || contains(keys(local.refs), value)])
      error_message = "An env value of ${each.key} in functions.json names a table, queue or bucket stack.json does not have."
    }
  }

  depends_on = [aws_cloudwatch_log_group.function, aws_iam_role_policy.function]
}

# Schedules (EventBridge rules: the payload is the "Scheduled Event" events/ has).
resource "aws_cloudwatch_event_rule" "schedule" {
  for_each            = local.scheduled_functions
  name                = "${var.prefix}-${each.key}"
  description         = "Runs ${each.key}: ${each.value.description}"
  schedule_expression = each.value.trigger.expression
}

resource "aws_cloudwatch_event_target" "schedule" {
  for_each = local.scheduled_functions
  rule     = aws_cloudwatch_event_rule.schedule[each.key].name
  arn      = aws_lambda_function.function[each.key].arn
}

resource "aws_lambda_permission" "schedule" {
  for_each      = local.scheduled_functions
  statement_id  = "events"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.function[each.key].function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.schedule[each.key].arn
}

# SQS triggers: partial batch failures, as the handlers report them.
resource "aws_lambda_event_source_mapping" "sqs" {
  for_each                = local.sqs_functions
  function_name           = aws_lambda_function.function[each.key].arn
  event_source_arn        = "${local.arn.queue}${each.value.trigger.queue}"
  batch_size              = try(each.value.trigger.batch_size, 10)
  function_response_types = ["ReportBatchItemFailures"]

  # At most this many invocations drain the queue at once (slow receivers cannot take the
  # account's concurrency).
  dynamic "scaling_config" {
    for_each = try(each.value.trigger.max_concurrency, null) == null ? [] : [each.value.trigger.max_concurrency]
    content {
      maximum_concurrency = scaling_config.value
    }
  }
  depends_on = [aws_sqs_queue.queue, aws_sqs_queue.dead_letter, aws_iam_role_policy.function]
}

# DynamoDB stream triggers (job events).
resource "aws_lambda_event_source_mapping" "stream" {
  for_each                       = local.stream_functions
  function_name                  = aws_lambda_function.function[each.key].arn
  event_source_arn               = aws_dynamodb_table.table[each.value.trigger.table].stream_arn
  starting_position              = try(each.value.trigger.starting_position, "LATEST")
  batch_size                     = try(each.value.trigger.batch_size, 100)
  maximum_retry_attempts         = try(each.value.trigger.maximum_retry_attempts, 10)
  bisect_batch_on_function_error = true
  function_response_types        = ["ReportBatchItemFailures"]

  # After the retries (the failing record alone, by bisection), the batch's place in the
  # stream goes to the failures queue instead of being dropped.
  dynamic "destination_config" {
    for_each = try(each.value.trigger.on_failure, null) == null ? [] : [each.value.trigger.on_failure]
    content {
      on_failure {
        destination_arn = aws_sqs_queue.queue[destination_config.value].arn
      }
    }
  }
  depends_on = [aws_iam_role_policy.function]
}

# S3 triggers (objects dropped under a prefix, e.g. inbox/).
resource "aws_lambda_permission" "s3" {
  for_each       = local.s3_functions
  statement_id   = "s3"
  action         = "lambda:InvokeFunction"
  function_name  = aws_lambda_function.function[each.key].function_name
  principal      = "s3.amazonaws.com"
  source_arn     = aws_s3_bucket.bucket[each.value.trigger.bucket].arn
  source_account = local.account
}

# S3 invokes asynchronously: after Lambda's retries the event goes to the failures queue (not
# dropped), from which `kiln-replay inbox` starts the jobs.
resource "aws_lambda_function_event_invoke_config" "s3" {
  for_each                     = { for name, f in local.s3_functions : name => f if try(f.trigger.on_failure, null) != null }
  function_name                = aws_lambda_function.function[each.key].function_name
  maximum_retry_attempts       = 2
  maximum_event_age_in_seconds = 6 * 3600
  destination_config {
    on_failure {
      destination = aws_sqs_queue.queue[each.value.trigger.on_failure].arn
    }
  }
  depends_on = [aws_iam_role_policy.function]
}

resource "aws_s3_bucket_notification" "bucket" {
  for_each = toset([for name, f in local.s3_functions : f.trigger.bucket])
  bucket   = aws_s3_bucket.bucket[each.key].id

  dynamic "lambda_function" {
    for_each = { for name, f in local.s3_functions : name => f if f.trigger.bucket == each.key }
    content {
      lambda_function_arn = aws_lambda_function.function[lambda_function.key].arn
      events              = try(lambda_function.value.trigger.events, ["s3:ObjectCreated:*"])
      filter_prefix       = lambda_function.value.trigger.prefix
    }
  }

  depends_on = [aws_lambda_permission.s3]
}
