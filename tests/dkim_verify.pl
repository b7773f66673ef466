#!/usr/bin/perl
# An independent DKIM verifier for tests/test_dkim.py: Perl's Mail::DKIM (Debian
# libmail-dkim-perl), resolving through the test's DNS stub.
#   perl dkim_verify.pl DNS_PORT < message
# Prints one line per signature ("pass d=... a=..." or "fail (...)"); exit 0 only when there is
# at least one signature and every one passes.
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS::Resolver;

my $port = shift or die "usage: $0 DNS_PORT\n";
Mail::DKIM::DNS::resolver(
    Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port, recurse => 1,
                            udp_timeout => 5, tcp_timeout => 5, retry => 1));
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (<STDIN>) {
    s/\015?\012$/\015\012/;
    $dkim->PRINT($_);
}
$dkim->CLOSE;
my @sigs = $dkim->signatures;
my $ok = @sigs > 0;
foreach my $sig (@sigs) {
    my $result = $sig->result;
    $ok = 0 unless $result eq 'pass';
    my $detail = $sig->result_detail;
    print "$result d=", $sig->domain, " a=", $sig->algorithm, " ($detail)\n";
}
exit($ok ? 0 : 1);
