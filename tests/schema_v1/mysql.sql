-- The schema of version 1, as models.py created it, with rows: a database to migrate.
CREATE TABLE IF NOT EXISTS `outbox` (`id` INTEGER AUTO_INCREMENT NOT NULL PRIMARY KEY, `recipient` VARCHAR(254) NOT NULL, `first_name` VARCHAR(100) NOT NULL, `last_name` VARCHAR(100) NOT NULL, `status` VARCHAR(8) NOT NULL, `due_at` DOUBLE PRECISION NOT NULL, `attempts` INTEGER NOT NULL, `claim` VARCHAR(32) NOT NULL, `last_error` VARCHAR(200) NOT NULL);
CREATE INDEX `outbox_status_due_at` ON `outbox` (`status`, `due_at`);
CREATE TABLE IF NOT EXISTS `person` (`id` INTEGER AUTO_INCREMENT NOT NULL PRIMARY KEY, `first_name` VARCHAR(100) NOT NULL, `last_name` VARCHAR(100) NOT NULL, `email` VARCHAR(254) NOT NULL, `email_key` CHAR(64) NOT NULL);
CREATE UNIQUE INDEX `person_email_key` ON `person` (`email_key`);
INSERT INTO `person` (first_name, last_name, email, email_key) VALUES ('Ada', 'Lovelace', 'ada@example.com', 'b5fc85e55755f9e0d030a10ab4429b6b2944855f9a0d60077fe832becbc41d72');
INSERT INTO `person` (first_name, last_name, email, email_key) VALUES ('José', 'Núñez', 'Jose@Example.com', 'b12dcff163bf9a9349a168651427cf2c1b18b64c209a198f95ef5772881cdc4d');
INSERT INTO `person` (first_name, last_name, email, email_key) VALUES ('Grace', 'Hopper', 'grace@example.com', 'b533d4547eaa5a0fa955965a1ca393ccd2ea013032a105726f232eb41bddc4fa');
INSERT INTO `person` (first_name, last_name, email, email_key) VALUES ('李', '小龙', 'li@example.com', 'b9b55f36c238a61026abc7e4c6be9758363c10c54a4e4462f83f33458230eafe');
DELETE FROM `person` WHERE id = 3;
INSERT INTO `outbox` (recipient, first_name, last_name, status, due_at, attempts, claim, last_error) VALUES ('ada@example.com', 'Ada', 'Lovelace', 'sent', 1700000000.0, 1, '', '');
INSERT INTO `outbox` (recipient, first_name, last_name, status, due_at, attempts, claim, last_error) VALUES ('Jose@Example.com', 'José', 'Núñez', 'pending', 1700000001.5, 0, '', '');
INSERT INTO `outbox` (recipient, first_name, last_name, status, due_at, attempts, claim, last_error) VALUES ('li@example.com', '李', '小龙', 'failed', 1700000002.0, 3, '', '');
