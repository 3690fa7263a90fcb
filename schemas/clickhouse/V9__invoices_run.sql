-- The run that wrote an invoice's header, and with it the lines that are the invoice's
-- (see V8).
--
-- From this version `invoice` holds the invoice as JSON without its lines, which are the
-- `invoice_lines` rows with this header's invoice_id and run_id; headers written before
-- hold the whole invoice, lines included. A reader rebuilds the invoice from the header
-- and its lines, and the rebuilt invoice serializes to the same bytes the run returned.
ALTER TABLE invoices ADD COLUMN run_id String DEFAULT ''
