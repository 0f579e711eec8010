# The gpu-runners: an EC2 Auto Scaling group of GPU instances, one kiln-runner container each.
#
# Why an Auto Scaling group and not an ECS capacity provider: one runner owns one GPU, so the
# instance is the unit of scaling and there is nothing to bin-pack; ECS would add a second
# control loop (service desired count on the backlog, then capacity-provider scaling of the
# instances behind it) and so a slower wake from zero; and ECS gives a stopping container at
# most 120 s (stopTimeout) after SIGTERM, while a render may run longer. An ASG termination
# lifecycle hook holds an instance for as long as the drain needs (the hook's timeout below).
#
# Scaling: the group's capacity is counted in GPUs (each instance type weighted by its GPUs,
# runner_instance_gpus), so types with 1, 4 and 8 GPUs mix. Target tracking on backlog per GPU,
# computed with metric math from the queued jobs of normal and high priority (`kiln`
# SchedulableBacklog, published every minute by expire-jobs as an EMF log line; low-priority
# jobs never make the group grow on their own) over the group's in-service capacity. Target tracking sizes the group in proportion to its current size and so cannot
# leave zero; a step policy on a "backlog while no instance runs" alarm adds the first one.
#
# A render is never killed by scale-in: the agent on each instance (runner-agent.sh) turns on
# the instance's scale-in protection while the runner holds a job (kiln_runner_in_flight > 0
# on :9090/metrics) and off when idle, so scale-in picks idle instances; and an instance that
# is terminated anyway (a protected instance during a refresh, a manual termination, a race
# with the protection) waits in Terminating:Wait while the agent stops the container (SIGTERM:
# the runner stops taking jobs, finishes its renders within KILN_SHUTDOWN_DEADLINE_SECS, hands
# any left back to the queue) and then completes the lifecycle action.

locals {
  runner_group = "${var.prefix}-runners"
  runner_env = merge(
    { for key, value in merge(local.deploy.common_env, local.runner.env) : key => lookup(local.refs, value, value) },
    var.runner_env,
  )
  runner_drain_seconds = tonumber(local.runner_env["KILN_SHUTDOWN_DEADLINE_SECS"])
  runner_image         = "${aws_ecr_repository.runner.repository_url}:${var.runner_image_tag}"
  runner_max_gpus      = var.runner_image_tag == "" ? 0 : var.runner_max_gpus
  runner_subnets       = length(var.runner_subnet_ids) > 0 ? var.runner_subnet_ids : data.aws_subnets.default[0].ids
  runner_vpc           = length(var.runner_subnet_ids) > 0 ? data.aws_subnet.first[0].vpc_id : data.aws_vpc.default[0].id
  job_queue_name       = aws_sqs_queue.queue["jobs"].name
}

# --- image -----------------------------------------------------------------------------

resource "aws_ecr_repository" "runner" {
  name                 = "${var.prefix}-gpu-runner"
  image_tag_mutability = "IMMUTABLE"
  force_delete         = !var.deletion_protection
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
  }
}

resource "aws_ecr_lifecycle_policy" "runner" {
  repository = aws_ecr_repository.runner.name
  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "Keep the 10 newest images"
      selection    = { tagStatus = "any", countType = "imageCountMoreThan", countNumber = 10 }
      action       = { type = "expire" }
    }]
  })
}

# --- network ---------------------------------------------------------------------------

data "aws_vpc" "default" {
  count   = length(var.runner_subnet_ids) > 0 ? 0 : 1
  default = true
}

data "aws_subnets" "default" {
  count = length(var.runner_subnet_ids) > 0 ? 0 : 1
  filter {
    name   = "vpc-id"
    values = [data.aws_vpc.default[0].id]
  }
}

data "aws_subnet" "first" {
  count = length(var.runner_subnet_ids) > 0 ? 1 : 0
  id    = var.runner_subnet_ids[0]
}

resource "aws_security_group" "runner" {
  name        = "${var.prefix}-runner"
  description = "kiln gpu-runners: no inbound traffic; HTTPS out to AWS APIs and the image registry"
  vpc_id      = local.runner_vpc

  egress {
    description = "HTTPS to SQS, DynamoDB, S3, ECR, CloudWatch and Auto Scaling"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

# --- identity ----------------------------------------------------------------------------

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "runner" {
  name               = "${var.prefix}-runner"
  description        = "kiln gpu-runner instances: the runner's data access and the agent's scaling calls"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy" "runner" {
  name = "access"
  role = aws_iam_role.runner.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(
      # What kiln-runner calls (functions.json; tests/terraform.rs records it).
      local.access_statements["runner"],
      [
        {
          Sid      = "PullImage"
          Effect   = "Allow"
          Action   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]
          Resource = [aws_ecr_repository.runner.arn]
        },
        {
          Sid      = "RegistryLogin"
          Effect   = "Allow"
          Action   = ["ecr:GetAuthorizationToken"]
          Resource = ["*"] # the action has no resource: it returns a token for the account's registry
        },
        {
          Sid      = "ContainerLogs"
          Effect   = "Allow"
          Action   = ["logs:CreateLogStream", "logs:PutLogEvents"]
          Resource = ["${aws_cloudwatch_log_group.runner.arn}:*"]
        },
        {
          # What runner-agent.sh calls (tests/runner_agent.rs holds the two to each other).
          Sid      = "AgentScaling"
          Effect   = "Allow"
          Action   = ["autoscaling:SetInstanceProtection", "autoscaling:CompleteLifecycleAction", "autoscaling:SetInstanceHealth"]
          Resource = ["arn:${local.partition}:autoscaling:${local.region}:${local.account}:autoScalingGroup:*:autoScalingGroupName/${local.runner_group}"]
        },
        {
          Sid       = "AgentMetrics"
          Effect    = "Allow"
          Action    = ["cloudwatch:PutMetricData"]
          Resource  = ["*"] # PutMetricData has no resource; the condition holds it to kiln's namespace
          Condition = { StringEquals = { "cloudwatch:namespace" = "kiln" } }
        },
      ],
    )
  })
}

resource "aws_iam_instance_profile" "runner" {
  name = "${var.prefix}-runner"
  role = aws_iam_role.runner.name
}

resource "aws_cloudwatch_log_group" "runner" {
  #checkov:skip=CKV_AWS_158:Logs are encrypted by CloudWatch's own key; runner logs hold job ids and timings.
  #checkov:skip=CKV_AWS_338:Retention is a variable (log_retention_days, 30 days by default); a year is a compliance choice, not a default.
  name              = "/kiln/${var.prefix}/gpu-runner"
  retention_in_days = var.log_retention_days
}

# --- instances ---------------------------------------------------------------------------

data "aws_ssm_parameter" "runner_ami" {
  name = var.runner_ami_ssm_parameter
}

resource "aws_launch_template" "runner" {
  #checkov:skip=CKV_AWS_88:Only with runner_assign_public_ip (default VPC, no NAT): the address is for reaching AWS APIs; the security group admits no inbound traffic.
  name_prefix            = "${var.prefix}-runner-"
  description            = "kiln gpu-runner: GPU AMI, the runner container and its agent"
  image_id               = data.aws_ssm_parameter.runner_ami.insecure_value
  update_default_version = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.runner.arn
  }

  network_interfaces {
    associate_public_ip_address = var.runner_assign_public_ip
    security_groups             = [aws_security_group.runner.id]
    delete_on_termination       = true
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = var.runner_volume_gb
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  metadata_options {
    http_tokens                 = "required"
    http_put_response_hop_limit = 1 # the container uses the host's network
    http_endpoint               = "enabled"
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  user_data = base64encode(templatefile("${path.module}/runner-user-data.sh.tftpl", {
    region        = local.region
    registry      = split("/", aws_ecr_repository.runner.repository_url)[0]
    image         = local.runner_image
    env           = local.runner_env
    log_group     = aws_cloudwatch_log_group.runner.name
    group         = local.runner_group
    hook          = "${var.prefix}-drain"
    drain_seconds = local.runner_drain_seconds
    metrics_port  = split(":", local.runner_env["KILN_METRICS_ADDR"])[1]
    agent         = file("${path.module}/runner-agent.sh")
  }))

  tag_specifications {
    resource_type = "instance"
    tags          = { Name = "${var.prefix}-gpu-runner" }
  }
}

resource "aws_autoscaling_group" "runner" {
  #checkov:skip=CKV_AWS_153:Tags reach instances through the launch template's tag_specifications and the provider's default_tags.
  name                      = local.runner_group
  min_size                  = min(var.runner_min_gpus, local.runner_max_gpus)
  max_size                  = local.runner_max_gpus
  vpc_zone_identifier       = local.runner_subnets
  health_check_type         = "EC2"
  health_check_grace_period = 600
  default_instance_warmup   = 300
  protect_from_scale_in     = false
  capacity_rebalance        = false
  metrics_granularity       = "1Minute"
  enabled_metrics           = ["GroupInServiceInstances", "GroupInServiceCapacity", "GroupDesiredCapacity", "GroupPendingInstances", "GroupTerminatingInstances"]

  mixed_instances_policy {
    instances_distribution {
      on_demand_base_capacity                  = 0
      on_demand_percentage_above_base_capacity = 100
      on_demand_allocation_strategy            = "prioritized"
    }
    launch_template {
      launch_template_specification {
        launch_template_id = aws_launch_template.runner.id
        version            = aws_launch_template.runner.latest_version
      }
      dynamic "override" {
        for_each = var.runner_instance_types
        content {
          instance_type     = override.value
          weighted_capacity = tostring(var.runner_instance_gpus[override.value])
        }
      }
    }
  }

  # Every instance drains before it goes (see the header).
  initial_lifecycle_hook {
    name                 = "${var.prefix}-drain"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    default_result       = "CONTINUE"
    heartbeat_timeout    = local.runner_drain_seconds + 300
  }

  # A new image or template rolls the group; protected (busy) instances are replaced too,
  # each after its drain.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage       = 50
      scale_in_protected_instances = "Refresh"
    }
  }

  # The scaling policies own the desired capacity.
  lifecycle {
    ignore_changes = [desired_capacity]
    precondition {
      condition     = alltrue([for type in var.runner_instance_types : contains(keys(var.runner_instance_gpus), type)])
      error_message = "Every type of runner_instance_types needs its GPU count in runner_instance_gpus."
    }
  }
}

# Backlog per GPU: queued jobs that may scale out (normal and high priority) over in-service
# capacity (GPUs; over 1 when none).
resource "aws_autoscaling_policy" "runner_backlog" {
  name                      = "${var.prefix}-backlog-per-gpu"
  autoscaling_group_name    = aws_autoscaling_group.runner.name
  policy_type               = "TargetTrackingScaling"
  estimated_instance_warmup = 300

  target_tracking_configuration {
    target_value = var.runner_backlog_per_gpu
    customized_metric_specification {
      metrics {
        id          = "queued"
        return_data = false
        metric_stat {
          stat = "Maximum"
          metric {
            namespace   = "kiln"
            metric_name = "SchedulableBacklog"
            dimensions {
              name  = "QueueName"
              value = local.job_queue_name
            }
          }
        }
      }
      metrics {
        id          = "running"
        return_data = false
        metric_stat {
          stat = "Average"
          metric {
            namespace   = "AWS/AutoScaling"
            metric_name = "GroupInServiceCapacity"
            dimensions {
              name  = "AutoScalingGroupName"
              value = local.runner_group
            }
          }
        }
      }
      metrics {
        id          = "backlog"
        label       = "Queued jobs of normal and high priority per in-service runner GPU"
        expression  = "queued / IF(running > 0, running, 1)"
        return_data = true
      }
    }
  }
}

# Waking from zero: one instance when messages wait and none runs.
resource "aws_autoscaling_policy" "runner_wake" {
  name                   = "${var.prefix}-wake-from-zero"
  autoscaling_group_name = aws_autoscaling_group.runner.name
  policy_type            = "StepScaling"
  adjustment_type        = "ChangeInCapacity"

  step_adjustment {
    scaling_adjustment          = 1
    metric_interval_lower_bound = 0
  }
}

resource "aws_cloudwatch_metric_alarm" "runner_wake" {
  alarm_name          = "${var.prefix}-jobs-waiting-without-runners"
  alarm_description   = "Jobs of normal or high priority are queued and no runner is in service: start one (low-priority jobs alone do not)."
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_autoscaling_policy.runner_wake.arn]

  metric_query {
    id          = "waiting"
    expression  = "IF(queued > 0 AND FILL(running, 0) == 0, 1, 0)"
    label       = "Jobs waiting with no runner"
    return_data = true
  }
  metric_query {
    id = "queued"
    metric {
      namespace   = "kiln"
      metric_name = "SchedulableBacklog"
      dimensions  = { QueueName = local.job_queue_name }
      period      = 60
      stat        = "Maximum"
    }
  }
  metric_query {
    id = "running"
    metric {
      namespace   = "AWS/AutoScaling"
      metric_name = "GroupInServiceInstances"
      dimensions  = { AutoScalingGroupName = local.runner_group }
      period      = 60
      stat        = "Maximum"
    }
  }
}
