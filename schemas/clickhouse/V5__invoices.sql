-- Final invoices, written once per tenant, customer and period by the rater's final run.
--
-- `invoices` holds one header per final invoice with the whole invoice as JSON, exactly as
-- the run returned it, so a later run (or an export) returns the same bytes. A run writes
-- an invoice's lines before its header: an invoice is final once its header is stored, and
-- a run killed between the two inserts writes the lines again next time. Readers take one
-- copy per (invoice_id, line_no) of invoices that have a header.
CREATE TABLE IF NOT EXISTS invoices
(
    tenant String,
    customer String,
    -- tenant/customer/<period start, unix seconds>
    invoice_id String,
    period_start DateTime('UTC'),
    period_end DateTime('UTC'),
    currency String,
    -- Decimal amounts as text: exact, in the currency's minor unit.
    subtotal String,
    total String,
    invoice String,
    finalized_at DateTime('UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(period_start)
ORDER BY (tenant, invoice_id);

CREATE TABLE IF NOT EXISTS invoice_lines
(
    tenant String,
    customer String,
    invoice_id String,
    period_start DateTime('UTC'),
    line_no UInt32,
    -- Index of the plan segment the line prices; -1 for the invoice-minimum line.
    segment Int32,
    kind String,
    charge String,
    meter String,
    quantity String,
    amount String,
    currency String,
    -- The line as JSON, tier breakdown included.
    line String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(period_start)
ORDER BY (tenant, invoice_id, line_no);
