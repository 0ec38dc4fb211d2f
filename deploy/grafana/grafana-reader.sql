-- A read-only PostgreSQL role for Grafana: it sees the dashboard views, nothing else
-- (no patient names or birth dates, which only the tables hold).
-- psql -v password="'...'" -f deploy/grafana/grafana-reader.sql cttriage   (after `ct-triage db upgrade`)
CREATE ROLE grafana_reader LOGIN PASSWORD :password;
GRANT CONNECT ON DATABASE cttriage TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
GRANT SELECT ON worklist, turnaround, throughput_hourly, category_mix_daily, failures, queue_depth TO grafana_reader;
