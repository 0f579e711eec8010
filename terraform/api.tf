# The public API behind AWS WAF. AWS WAF cannot be associated with an HTTP API (apigatewayv2),
# so the routes of functions.json are served by a regional REST API (the same Lambda functions,
# AWS_PROXY integrations; the event is the REST proxy format, which lambda_http decodes with its
# `apigw_rest` feature) and a regional web ACL sits on its stage.
#
# What the edge guarantees, in order (the web ACL runs before anything else API Gateway does):
#   1. keyless  - a request without a well-formed `Authorization: Bearer kiln_<40 base62>` is
#                 answered 401 by WAF: it never reaches the stage, its throttle or a function.
#   2. per-ip   - one source address gets at most edge_ip_requests_per_minute (keyed or not).
#   3. per-key  - one API key gets at most edge_key_requests_per_minute: the per-tenant
#                 throttle (per key; a tenant with two keys has two budgets).
#   4. the stage throttle (api_throttle_*) stays as the aggregate bound on the backend.
# The functions still authenticate every request (kiln-app Authenticator): WAF checks the form
# of a key, not whether it exists: well-formed fake keys from many addresses can still reach
# the stage throttle (a cached Lambda authorizer and usage plans would close that; not built).

locals {
  # "POST /v1/jobs/{id}/cancel" => { method = "POST", path = "/v1/jobs/{id}/cancel", function = "cancel-job" }
  rest_routes = {
    for route, function in local.http_routes : route => {
      method   = split(" ", route)[0]
      path     = split(" ", route)[1]
      function = function
    }
  }

  # Every resource path the routes need, parents included (/v1, /v1/jobs, /v1/jobs/{id}, ...),
  # with its depth, its last segment and its parent. REST resources form a tree; terraform
  # cannot make one resource block refer to itself, so there is one block per depth (<= 4).
  rest_paths = distinct(flatten([
    for route in values(local.rest_routes) : [
      for depth in range(1, length(split("/", route.path))) : join("/", slice(split("/", route.path), 0, depth + 1))
    ]
  ]))
  rest_path = {
    for path in local.rest_paths : path => {
      depth  = length(split("/", path)) - 1
      part   = element(split("/", path), length(split("/", path)) - 1)
      parent = join("/", slice(split("/", path), 0, length(split("/", path)) - 1))
    }
  }
  rest_resource_ids = merge(
    { for path, resource in aws_api_gateway_resource.depth1 : path => resource.id },
    { for path, resource in aws_api_gateway_resource.depth2 : path => resource.id },
    { for path, resource in aws_api_gateway_resource.depth3 : path => resource.id },
    { for path, resource in aws_api_gateway_resource.depth4 : path => resource.id },
  )

  api_stage = "live"

  # The form of an API key (kiln-app ApiKey::generate: `kiln_` and 40 base62 characters), as
  # the functions accept it in the header (`Bearer ` or `bearer `, surrounding spaces trimmed).
  edge_key_pattern = "^[Bb]earer +kiln_[0-9A-Za-z]{40} *$"

  # The paths of the public routes (functions.json's `public`), with or without the stage in
  # front: the keyless rule lets these through.
  edge_public_path_pattern = "^(/${local.api_stage})?(${join("|", sort([for route in local.public_routes : replace(split(" ", route)[1], ".", "\\.")]))})$"

  # Bodies in the API's own error shape ({"error": {code, message, field}}, kiln-api error.rs).
  edge_errors = {
    unauthorized = { code = "unauthorized", message = "missing or malformed Authorization header; send `Authorization: Bearer <api key>`", field = "Authorization" }
    rate_limited = { code = "rate_limited", message = "too many requests from this key or address; retry after a minute", field = null }
  }
}

# --- the REST API -----------------------------------------------------------------------------

resource "aws_api_gateway_rest_api" "api" {
  name        = "${var.prefix}-api"
  description = "kiln: jobs and models"

  endpoint_configuration {
    types = ["REGIONAL"]
  }

  lifecycle {
    create_before_destroy = true
    precondition {
      condition     = alltrue([for path in values(local.rest_path) : path.depth <= 4])
      error_message = "A route of functions.json is deeper than four segments; add an aws_api_gateway_resource block for the next depth in edge.tf."
    }
  }
}

resource "aws_api_gateway_resource" "depth1" {
  for_each    = { for path, p in local.rest_path : path => p if p.depth == 1 }
  rest_api_id = aws_api_gateway_rest_api.api.id
  parent_id   = aws_api_gateway_rest_api.api.root_resource_id
  path_part   = each.value.part
}

resource "aws_api_gateway_resource" "depth2" {
  for_each    = { for path, p in local.rest_path : path => p if p.depth == 2 }
  rest_api_id = aws_api_gateway_rest_api.api.id
  parent_id   = aws_api_gateway_resource.depth1[each.value.parent].id
  path_part   = each.value.part
}

resource "aws_api_gateway_resource" "depth3" {
  for_each    = { for path, p in local.rest_path : path => p if p.depth == 3 }
  rest_api_id = aws_api_gateway_rest_api.api.id
  parent_id   = aws_api_gateway_resource.depth2[each.value.parent].id
  path_part   = each.value.part
}

resource "aws_api_gateway_resource" "depth4" {
  for_each    = { for path, p in local.rest_path : path => p if p.depth == 4 }
  rest_api_id = aws_api_gateway_rest_api.api.id
  parent_id   = aws_api_gateway_resource.depth3[each.value.parent].id
  path_part   = each.value.part
}

# A second, WAF-independent check: API Gateway itself refuses a request without the header
# (400 made 401 below) before the integration. WAF already refused it; this holds if the web
# ACL is ever detached.
resource "aws_api_gateway_request_validator" "authorization" {
  rest_api_id                 = aws_api_gateway_rest_api.api.id
  name                        = "authorization-header"
  validate_request_parameters = true
  validate_request_body       = false
}

resource "aws_api_gateway_method" "route" {
  #checkov:skip=CKV_AWS_59:Every route authenticates in the function (kiln-app Authenticator: API key hashes in the tenants table, 401 otherwise); the web ACL refuses requests without a well-formed key first.
  for_each             = local.rest_routes
  rest_api_id          = aws_api_gateway_rest_api.api.id
  resource_id          = local.rest_resource_ids[each.value.path]
  http_method          = each.value.method
  authorization        = "NONE"
  request_validator_id = contains(local.public_routes, each.key) ? null : aws_api_gateway_request_validator.authorization.id
  request_parameters   = contains(local.public_routes, each.key) ? {} : { "method.request.header.Authorization" = true }
}

resource "aws_api_gateway_integration" "route" {
  for_each                = local.rest_routes
  rest_api_id             = aws_api_gateway_rest_api.api.id
  resource_id             = aws_api_gateway_method.route[each.key].resource_id
  http_method             = aws_api_gateway_method.route[each.key].http_method
  type                    = "AWS_PROXY"
  integration_http_method = "POST"
  uri                     = aws_lambda_function.function[each.value.function].invoke_arn
  timeout_milliseconds    = min(29000, local.functions[each.value.function].timeout_s * 1000)
}

resource "aws_api_gateway_gateway_response" "missing_authorization" {
  rest_api_id   = aws_api_gateway_rest_api.api.id
  response_type = "BAD_REQUEST_PARAMETERS"
  status_code   = "401"
  response_templates = {
    "application/json" = jsonencode({ error = local.edge_errors.unauthorized })
  }
}

resource "aws_api_gateway_deployment" "api" {
  rest_api_id = aws_api_gateway_rest_api.api.id
  triggers = {
    redeployment = sha1(jsonencode([
      local.rest_routes,
      [for r in aws_api_gateway_method.route : [r.id, r.request_parameters]],
      [for r in aws_api_gateway_integration.route : [r.id, r.uri, r.timeout_milliseconds]],
      aws_api_gateway_gateway_response.missing_authorization.response_templates,
    ]))
  }
  lifecycle {
    create_before_destroy = true
  }
  depends_on = [aws_api_gateway_integration.route]
}

resource "aws_cloudwatch_log_group" "api_access" {
  #checkov:skip=CKV_AWS_158:Logs are encrypted by CloudWatch's own key; access logs hold no bodies or keys.
  #checkov:skip=CKV_AWS_338:Retention is a variable (log_retention_days, 30 days by default); a year is a compliance choice, not a default.
  name              = "/aws/apigateway/${var.prefix}-api"
  retention_in_days = var.log_retention_days
}

resource "aws_api_gateway_stage" "api" {
  #checkov:skip=CKV_AWS_120:Answers are per tenant and per job state; an API cache would serve one tenant's answer to the next request or stale job states.
  #checkov:skip=CKV_AWS_73:The functions emit tracing spans as JSON logs, not X-Ray segments; API latency is on the dashboard from API Gateway metrics.
  #checkov:skip=CKV2_AWS_77:The API and its functions are Rust (no Java, no Log4j); the web ACL carries kiln's own rules, not the known-bad-inputs group.
  #checkov:skip=CKV2_AWS_51:A public API for tenants' own clients: callers authenticate with API keys, not client certificates, and the integrations are Lambda, not HTTP backends.
  rest_api_id   = aws_api_gateway_rest_api.api.id
  deployment_id = aws_api_gateway_deployment.api.id
  stage_name    = local.api_stage

  access_log_settings {
    destination_arn = aws_cloudwatch_log_group.api_access.arn
    format = jsonencode({
      requestId          = "$context.requestId"
      sourceIp           = "$context.identity.sourceIp"
      requestTime        = "$context.requestTime"
      method             = "$context.httpMethod"
      resourcePath       = "$context.resourcePath"
      path               = "$context.path"
      status             = "$context.status"
      protocol           = "$context.protocol"
      responseLength     = "$context.responseLength"
      responseLatency    = "$context.responseLatency"
      integrationLatency = "$context.integrationLatency"
      integrationError   = "$context.integrationErrorMessage"
      waf                = "$context.wafResponseCode"
      errorType          = "$context.error.responseType"
    })
  }

  depends_on = [aws_api_gateway_account.api]
}

# Default throttling of every method: the aggregate bound on what reaches the functions.
resource "aws_api_gateway_method_settings" "all" {
  #checkov:skip=CKV_AWS_225:Answers are per tenant and per job state; caching them would serve stale or foreign answers.
  #checkov:skip=CKV_AWS_308:No cache is enabled (CKV_AWS_225), so there is no cache to encrypt.
  rest_api_id = aws_api_gateway_rest_api.api.id
  stage_name  = aws_api_gateway_stage.api.stage_name
  method_path = "*/*"

  settings {
    metrics_enabled        = true
    logging_level          = "ERROR"
    data_trace_enabled     = false
    throttling_rate_limit  = var.api_throttle_rate_limit
    throttling_burst_limit = var.api_throttle_burst_limit
  }
}

resource "aws_lambda_permission" "api" {
  for_each      = toset(values(local.http_routes))
  statement_id  = "api"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.function[each.key].function_name
  principal     = "apigateway.amazonaws.com"
  source_arn    = "${aws_api_gateway_rest_api.api.execution_arn}/*/*"
}

# REST APIs write access and execution logs through one role per account and region (HTTP
# APIs need none). An account that already has one sets manage_api_gateway_account = false.
data "aws_iam_policy_document" "api_gateway_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["apigateway.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "api_gateway_logs" {
  count              = var.manage_api_gateway_account ? 1 : 0
  name               = "${var.prefix}-apigateway-logs"
  description        = "API Gateway (account-wide setting) writes REST API logs to CloudWatch"
  assume_role_policy = data.aws_iam_policy_document.api_gateway_assume.json
}

resource "aws_iam_role_policy_attachment" "api_gateway_logs" {
  count      = var.manage_api_gateway_account ? 1 : 0
  role       = aws_iam_role.api_gateway_logs[0].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonAPIGatewayPushToCloudWatchLogs"
}

resource "aws_api_gateway_account" "api" {
  count               = var.manage_api_gateway_account ? 1 : 0
  cloudwatch_role_arn = aws_iam_role.api_gateway_logs[0].arn
  depends_on          = [aws_iam_role_policy_attachment.api_gateway_logs]
}

# --- the web ACL on the stage -----------------------------------------------------------------

resource "aws_wafv2_web_acl" "api" {
  #checkov:skip=CKV_AWS_192:The API and its functions are Rust (no Java, no Log4j); the known-bad-inputs rule group would add capacity and cost for nothing it can reach.
  name        = "${var.prefix}-api"
  description = "kiln API: no key, no entry; per-address and per-key request rates"
  scope       = "REGIONAL"

  default_action {
    allow {}
  }

  dynamic "custom_response_body" {
    for_each = local.edge_errors
    content {
      key          = custom_response_body.key
      content_type = "APPLICATION_JSON"
      content      = jsonencode({ error = custom_response_body.value })
    }
  }

  # 1. No well-formed bearer key: 401, on every path but the public routes' (functions.json's
  #    `public`: the API document and the playground page).
  rule {
    name     = "keyless"
    priority = 0
    action {
      block {
        custom_response {
          response_code            = 401
          custom_response_body_key = "unauthorized"
        }
      }
    }
    statement {
      and_statement {
        statement {
          not_statement {
            statement {
              regex_match_statement {
                regex_string = local.edge_key_pattern
                field_to_match {
                  single_header {
                    name = "authorization"
                  }
                }
                text_transformation {
                  priority = 0
                  type     = "NONE"
                }
              }
            }
          }
        }
        statement {
          not_statement {
            statement {
              regex_match_statement {
                regex_string = local.edge_public_path_pattern
                field_to_match {
                  uri_path {}
                }
                text_transformation {
                  priority = 0
                  type     = "NONE"
                }
              }
            }
          }
        }
      }
    }
    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.prefix}-api-keyless"
      sampled_requests_enabled   = true
    }
  }

  # 2. Per source address: bounds one host spraying well-formed but unknown keys.
  rule {
    name     = "per-ip"
    priority = 1
    action {
      block {
        custom_response {
          response_code            = 429
          custom_response_body_key = "rate_limited"
        }
      }
    }
    statement {
      rate_based_statement {
        aggregate_key_type    = "IP"
        limit                 = var.edge_ip_requests_per_minute
        evaluation_window_sec = 60
      }
    }
    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.prefix}-api-per-ip"
      sampled_requests_enabled   = true
    }
  }

  # 3. Per API key: the per-tenant throttle. Only requests carrying the header are counted
  #    (WAF omits requests missing an aggregation key), which rule 1 has already settled.
  rule {
    name     = "per-key"
    priority = 2
    action {
      block {
        custom_response {
          response_code            = 429
          custom_response_body_key = "rate_limited"
        }
      }
    }
    statement {
      rate_based_statement {
        aggregate_key_type    = "CUSTOM_KEYS"
        limit                 = var.edge_key_requests_per_minute
        evaluation_window_sec = 60
        custom_key {
          header {
            name = "authorization"
            text_transformation {
              priority = 0
              type     = "NONE"
            }
          }
        }
      }
    }
    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.prefix}-api-per-key"
      sampled_requests_enabled   = true
    }
  }

  visibility_config {
    cloudwatch_metrics_enabled = true
    metric_name                = "${var.prefix}-api"
    sampled_requests_enabled   = true
  }
}

resource "aws_wafv2_web_acl_association" "api" {
  resource_arn = aws_api_gateway_stage.api.arn
  web_acl_arn  = aws_wafv2_web_acl.api.arn
}

# Blocked requests only, with the key redacted.
resource "aws_cloudwatch_log_group" "waf" {
  #checkov:skip=CKV_AWS_158:Logs are encrypted by CloudWatch's own key; the Authorization header is redacted before WAF writes them.
  #checkov:skip=CKV_AWS_338:Retention is a variable (log_retention_days, 30 days by default); a year is a compliance choice, not a default.
  name              = "aws-waf-logs-${var.prefix}-api"
  retention_in_days = var.log_retention_days
}

resource "aws_wafv2_web_acl_logging_configuration" "api" {
  resource_arn            = aws_wafv2_web_acl.api.arn
  log_destination_configs = [aws_cloudwatch_log_group.waf.arn]

  redacted_fields {
    single_header {
      name = "authorization"
    }
  }

  logging_filter {
    default_behavior = "DROP"
    filter {
      behavior    = "KEEP"
      requirement = "MEETS_ANY"
      condition {
        action_condition {
          action = "BLOCK"
        }
      }
    }
  }
}
