# Alarms (dead letters, old messages, API errors) to one SNS topic, and a dashboard of the
# golden signals: latency, traffic, errors, saturation (queue depth, runners, GPU).

resource "aws_sns_topic" "alarms" {
  name              = "${var.prefix}-alarms"
  kms_master_key_id = "alias/aws/sns"
}

resource "aws_sns_topic_subscription" "alarm_email" {
  count     = var.alarm_email == "" ? 0 : 1
  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = var.alarm_email
}

# Any message in a dead-letter queue is a job (or delivery) that failed every try; any in a
# failures queue is what Lambda gave up on (a stream batch, an inbox event), kept for kiln-replay.
locals {
  kept_queues = merge(
    { for key, queue in aws_sqs_queue.dead_letter : queue.name => "Messages reached ${queue.name}: every delivery of them failed." },
    { for key in local.failure_queues : aws_sqs_queue.queue[key].name => "Lambda gave up on events and kept them in ${aws_sqs_queue.queue[key].name}: fix the cause, then run kiln-replay (a stream batch within 24 hours)." },
  )
}

resource "aws_cloudwatch_metric_alarm" "not_empty" {
  for_each            = local.kept_queues
  alarm_name          = "${each.key}-not-empty"
  alarm_description   = each.value
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = each.key }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

# Work waiting too long: no runner is taking jobs (or too few), or a consumer is failing.
resource "aws_cloudwatch_metric_alarm" "oldest_message" {
  for_each            = merge(aws_sqs_queue.queue, { for key, queue in aws_sqs_queue.dead_letter : "${key}-dlq" => queue })
  alarm_name          = "${each.value.name}-oldest-message-age"
  alarm_description   = "The oldest message of ${each.value.name} has waited over ${var.queue_age_alarm_seconds} s."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateAgeOfOldestMessage"
  dimensions          = { QueueName = each.value.name }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 5
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.queue_age_alarm_seconds
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

resource "aws_cloudwatch_metric_alarm" "api_5xx" {
  alarm_name          = "${var.prefix}-api-5xx"
  alarm_description   = "The API answered 5xx to over 5% of requests for 5 minutes."
  comparison_operator = "GreaterThanThreshold"
  threshold           = 5
  evaluation_periods  = 5
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]

  metric_query {
    id          = "rate"
    expression  = "100 * errors / MAX([requests, 1])"
    label       = "5xx %"
    return_data = true
  }
  metric_query {
    id = "errors"
    metric {
      namespace   = "AWS/ApiGateway"
      metric_name = "5XXError"
      dimensions  = { ApiName = aws_api_gateway_rest_api.api.name, Stage = aws_api_gateway_stage.api.stage_name }
      period      = 60
      stat        = "Sum"
    }
  }
  metric_query {
    id = "requests"
    metric {
      namespace   = "AWS/ApiGateway"
      metric_name = "Count"
      dimensions  = { ApiName = aws_api_gateway_rest_api.api.name, Stage = aws_api_gateway_stage.api.stage_name }
      period      = 60
      stat        = "Sum"
    }
  }
}

locals {
  api_dims       = ["ApiName", aws_api_gateway_rest_api.api.name, "Stage", aws_api_gateway_stage.api.stage_name]
  function_names = [for name in keys(local.functions) : "${var.prefix}-${name}"]
  queue_names    = concat([for queue in aws_sqs_queue.queue : queue.name], [for queue in aws_sqs_queue.dead_letter : queue.name])
  group_dims     = ["AutoScalingGroupName", local.runner_group]
  # The API functions' own metrics (kiln-api::metrics, EMF lines): dimension Function is the
  # name in functions.json, unprefixed.
  api_function_keys = [for name, unit in local.functions : name if unit.trigger.type == "http"]

  widget = {
    latency = {
      title = "Latency: API (p50, p99) and job queue wait"
      metrics = [
        concat(["AWS/ApiGateway", "Latency"], local.api_dims, [{ stat = "p50", label = "API p50" }]),
        concat(["AWS/ApiGateway", "Latency"], local.api_dims, [{ stat = "p99", label = "API p99" }]),
        concat(["AWS/ApiGateway", "IntegrationLatency"], local.api_dims, [{ stat = "p99", label = "functions p99" }]),
        ["AWS/SQS", "ApproximateAgeOfOldestMessage", "QueueName", local.job_queue_name, { stat = "Maximum", label = "oldest queued job (s)", yAxis = "right" }],
      ]
    }
    function_duration = {
      title   = "Latency: function duration p99 (ms)"
      metrics = [for name in local.function_names : ["AWS/Lambda", "Duration", "FunctionName", name, { stat = "p99" }]]
    }
    traffic = {
      title = "Traffic: requests, jobs queued and rendered"
      metrics = [
        concat(["AWS/ApiGateway", "Count"], local.api_dims, [{ stat = "Sum", label = "API requests" }]),
        ["AWS/SQS", "NumberOfMessagesSent", "QueueName", local.job_queue_name, { stat = "Sum", label = "jobs queued" }],
        ["AWS/SQS", "NumberOfMessagesDeleted", "QueueName", local.job_queue_name, { stat = "Sum", label = "jobs finished" }],
      ]
    }
    errors = {
      title = "Errors: API 4xx/5xx, function errors and throttles, dead letters"
      metrics = concat(
        [
          concat(["AWS/ApiGateway", "4XXError"], local.api_dims, [{ stat = "Sum", label = "API 4xx" }]),
          concat(["AWS/ApiGateway", "5XXError"], local.api_dims, [{ stat = "Sum", label = "API 5xx" }]),
        ],
        [for name in local.function_names : ["AWS/Lambda", "Errors", "FunctionName", name, { stat = "Sum" }]],
        [for name in local.function_names : ["AWS/Lambda", "Throttles", "FunctionName", name, { stat = "Sum" }]],
        [for queue in aws_sqs_queue.dead_letter : ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", queue.name, { stat = "Maximum", label = "dead letters: ${queue.name}" }]],
      )
    }
    queues = {
      title = "Saturation: queue depth (visible and in flight)"
      metrics = concat(
        [for name in local.queue_names : ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", name, { stat = "Maximum" }]],
        [for name in local.queue_names : ["AWS/SQS", "ApproximateNumberOfMessagesNotVisible", "QueueName", name, { stat = "Maximum" }]],
        [
          ["kiln", "SchedulableBacklog", "QueueName", local.job_queue_name, { stat = "Maximum", label = "queued jobs that scale out" }],
          ["kiln", "LowPriorityBacklog", "QueueName", local.job_queue_name, { stat = "Maximum", label = "queued low-priority jobs" }],
        ],
      )
    }
    runners = {
      title = "Saturation: runners and the jobs they hold"
      metrics = [
        concat(["AWS/AutoScaling", "GroupInServiceInstances"], local.group_dims, [{ stat = "Maximum", label = "in service" }]),
        concat(["AWS/AutoScaling", "GroupInServiceCapacity"], local.group_dims, [{ stat = "Maximum", label = "GPUs in service" }]),
        concat(["AWS/AutoScaling", "GroupDesiredCapacity"], local.group_dims, [{ stat = "Maximum", label = "desired" }]),
        concat(["kiln", "RunnerJobsInFlight"], local.group_dims, [{ stat = "Sum", label = "jobs held by runners" }]),
      ]
    }
    gpu = {
      title = "Saturation: GPU utilisation and memory (%)"
      metrics = [
        concat(["kiln", "GPUUtilization"], local.group_dims, [{ stat = "Average", label = "GPU utilisation (avg)" }]),
        concat(["kiln", "GPUUtilization"], local.group_dims, [{ stat = "Maximum", label = "GPU utilisation (max)" }]),
        concat(["kiln", "GPUMemoryUtilization"], local.group_dims, [{ stat = "Maximum", label = "GPU memory (max)" }]),
      ]
    }
    api_outcomes = {
      title = "API: latency by function (p99 ms), submits by outcome, 429s by limit, webhook attempts"
      metrics = concat(
        [for name in local.api_function_keys : ["kiln/api", "LatencyMs", "Function", name, { stat = "p99" }]],
        [for metric in ["Created", "CacheHits", "Deduplicated", "IdempotentReplays", "ClientErrors", "ServerErrors"] :
        ["kiln/api", metric, "Function", "submit-job", { stat = "Sum", yAxis = "right" }]],
        [for limit in ["max_active_jobs", "jobs_per_minute", "units_per_day"] :
        ["kiln/api", "Throttled", "Limit", limit, { stat = "Sum", yAxis = "right", label = "429 ${limit}" }]],
        [for outcome in ["delivered", "retrying", "abandoned"] :
        ["kiln/webhooks", "Attempts", "Outcome", outcome, { stat = "Sum", yAxis = "right", label = "webhook ${outcome}" }]],
      )
    }
    concurrency = {
      title   = "Saturation: concurrent function executions"
      metrics = [for name in local.function_names : ["AWS/Lambda", "ConcurrentExecutions", "FunctionName", name, { stat = "Maximum" }]]
    }
  }
  widget_order = ["latency", "function_duration", "traffic", "errors", "queues", "runners", "gpu", "api_outcomes", "concurrency"]
}

resource "aws_cloudwatch_dashboard" "golden_signals" {
  dashboard_name = "${var.prefix}-golden-signals"
  dashboard_body = jsonencode({
    widgets = [
      for index, key in local.widget_order : {
        type   = "metric"
        x      = (index % 2) * 12
        y      = floor(index / 2) * 6
        width  = 12
        height = 6
        properties = {
          title   = local.widget[key].title
          region  = local.region
          view    = "timeSeries"
          stacked = false
          period  = 60
          metrics = local.widget[key].metrics
        }
      }
    ]
  })
}
