-- Final invoices whose lines reached the invoice-lines Kafka topic.
--
-- A final run stores an invoice (lines, then header), then publishes the lines of every
-- invoice of its batch that is stored but has no row here, then writes these rows. A run
-- killed after storing and before publishing leaves the invoice unpublished, and the next
-- run publishes it from its stored JSON; one killed after publishing and before this insert
-- publishes it again, with the same bytes and the same line ids, so consumers deduplicate by
-- `line_id`. Readers take one row per (tenant, invoice_id, topic).
CREATE TABLE IF NOT EXISTS invoice_publications
(
    tenant String,
    invoice_id String,
    topic String,
    period_start DateTime('UTC'),
    lines UInt32,
    published_at DateTime('UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(period_start)
ORDER BY (tenant, invoice_id, topic);
