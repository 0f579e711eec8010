//! The event functions: what runs on a schedule, on a queue, on the jobs table's stream and on
//! the bucket's notifications. Each module is named after its binary (`src/bin/<name>.rs`),
//! wires the ports it uses (`wire`), and turns its Lambda event into calls of a `kiln-app` use
//! case (`handle`); the decisions are the use cases'.
//!
//! | binary | trigger | use case |
//! |---|---|---|
//! | `expire-jobs` | EventBridge, every minute | `Jobs::expire_overdue` |
//! | `job-dead-letters` | SQS, the job queue's DLQ | `JobRuns::dead_lettered` |
//! | `job-events` | the jobs table's DynamoDB stream | `JobChanges::on_change` |
//! | `deliver-webhooks` | SQS, the webhook queue | `WebhookDeliverer::deliver` |
//! | `inbox-trigger` | S3, objects created under `inbox/` | `Inbox::on_object` |

pub mod deliver_webhooks;
pub mod expire_jobs;
pub mod inbox_trigger;
pub mod job_dead_letters;
pub mod job_events;
pub mod replay;
