# What every file shares: the two descriptions (stack.json: the data layer, functions.json:
# what runs the code), the account and region, and the resolution of functions.json's
# `@kind:name` references into real names.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  stack  = jsondecode(file("${path.module}/stack.json"))
  deploy = jsondecode(file("${path.module}/functions.json"))

  functions = local.deploy.functions
  runner    = local.deploy.runner

  account   = data.aws_caller_identity.current.account_id
  partition = data.aws_partition.current.partition
  region    = data.aws_region.current.name

  # ARN prefixes of the platform's resources; names are <prefix>-<key> everywhere.
  arn = {
    table = "arn:${local.partition}:dynamodb:${local.region}:${local.account}:table/${var.prefix}-"
    queue = "arn:${local.partition}:sqs:${local.region}:${local.account}:${var.prefix}-"
    s3    = "arn:${local.partition}:s3:::${var.prefix}-"
  }

  # The values functions.json's env may name.
  refs = merge(
    { for key, table in aws_dynamodb_table.table : "@table:${key}" => table.name },
    { for key, queue in aws_sqs_queue.queue : "@queue_url:${key}" => queue.url },
    { for key, queue in aws_sqs_queue.dead_letter : "@queue_url:${key}-dlq" => queue.url },
    { for key, bucket in aws_s3_bucket.bucket : "@bucket:${key}" => bucket.bucket },
  )

  # functions.json's access statements as IAM statements, per function and for the runner.
  # A reference to a name stack.json lacks makes an ARN that matches nothing; the test in
  # tests/terraform.rs refuses such names before terraform sees them.
  access_statements = {
    for name, spec in merge(local.functions, { runner = local.runner }) : name => [
      for statement in spec.access : merge({
        Effect = "Allow"
        Action = statement.actions
        Resource = concat(
          [for table in try(statement.tables, []) : "${local.arn.table}${table}"],
          [for index in try(statement.indexes, []) : "${local.arn.table}${split("/", index)[0]}/index/${split("/", index)[1]}"],
          [for queue in try(statement.queues, []) : "${local.arn.queue}${queue}"],
          [for object in try(statement.objects, []) : "${local.arn.s3}${object}"],
          [for bucket in try(statement.buckets, []) : "${local.arn.s3}${bucket}"],
        )
        },
        # `leading_keys`: only items whose partition key matches (e.g. `webhook#*` in the tenants
        # table, so a function that keeps webhook secrets cannot write API keys).
        { for key, condition in {
          Condition = { "ForAllValues:StringLike" = { "dynamodb:LeadingKeys" = flatten([
            for key in try(statement.leading_keys, []) : key == "@served_models" ? var.served_models : [key]
          ]) } }
        } : key => condition if length(try(statement.leading_keys, [])) > 0 }
      )
    ]
  }

  package_dir = var.lambda_package_dir != "" ? var.lambda_package_dir : "${path.module}/../target/lambda"
}
